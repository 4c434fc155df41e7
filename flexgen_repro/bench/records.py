"""What every benchmark record carries about where and with what it ran: the hardware (GPU, CPU,
memory, disk), the versions (Python, torch, CUDA, transformers, ...) and the git commit.

`probe()` runs the CUDA queries in a short child process (`python -m flexgen_repro.bench.records`)
so the runner itself never holds a CUDA context, which would take GPU memory from the cases.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

from flexgen_repro import envs

GiB = 1 << 30
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_VERSIONED = ("torch", "transformers", "accelerate", "numpy", "flexgen-repro")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> dict:
    try:
        import torch
    except ImportError:
        return {"cuda_available": False, "gpu_name": None, "gpu_count": 0, "gpu_mem_gb": None,
                "cuda_version": None}
    if not torch.cuda.is_available():
        return {"cuda_available": False, "gpu_name": None, "gpu_count": 0, "gpu_mem_gb": None,
                "cuda_version": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    return {"cuda_available": True, "gpu_name": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_mem_gb": round(props.total_memory / GiB, 2), "cuda_version": torch.version.cuda}


def local_hardware(offload_dir: str) -> dict:
    """This machine, measured in this process (imports torch; may create a CUDA context)."""
    import psutil
    where = os.path.abspath(os.path.expanduser(offload_dir))
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    disk = shutil.disk_usage(where)
    hw = _gpu()
    hw.update(cpu_model=cpu_model(), cpu_cores_logical=os.cpu_count(),
              cpu_cores_physical=psutil.cpu_count(logical=False),
              ram_gb=round(psutil.virtual_memory().total / GiB, 2),
              disk_path=where, disk_total_gb=round(disk.total / GiB, 1),
              disk_free_gb=round(disk.free / GiB, 1), platform=platform.platform())
    # named as flex_opt names it, so skipped and measured rows agree
    hw["device"] = hw["gpu_name"] or f"cpu ({platform.processor() or platform.machine()})"
    return hw


def versions() -> dict:
    """Versions of Python and the packages a run depends on (None where not installed)."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def probe(offload_dir: str, python: str = sys.executable, timeout_s: float = 120) -> dict:
    """{"hardware": ..., "versions": ...} measured in a child process (see the module docstring)."""
    cmd = [python, "-m", "flexgen_repro.bench.records", "--offload-dir", offload_dir]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode:
        raise RuntimeError(f"hardware probe failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tree_state(tree: str) -> dict:
    """git_state's fields for another source tree (a baseline run beside this one): its COMMIT
    file where it has one (a tree exported with `git archive`), else its git checkout's HEAD.
    Raises ValueError naming the fix when neither says which commit it is."""
    marker = os.path.join(tree, "COMMIT")
    if os.path.isfile(marker):
        with open(marker) as f:
            given = f.read().strip()
        if given:
            return {"commit": given[:7], "commit_full": given, "dirty": None}
    full = _git(tree, "rev-parse", "HEAD")
    if not full:
        raise ValueError(f"cannot tell which commit {tree} is: make it a git checkout (`git "
                         f"worktree add {tree} REV`) or write the commit into {tree}/COMMIT")
    return {"commit": full[:7], "commit_full": full, "dirty": None}


def _git(repo: str, *args: str) -> str | None:
    """`git args` in `repo`: its stripped output, or None where git fails or is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(repo: str = REPO_ROOT) -> dict:
    """{"commit": short hash plus "-dirty" when tracked files outside results/ changed,
    "commit_full", "dirty"}. envs.repro_commit(), when set, is the commit (a copy of the tree whose
    .git is absent or stale)."""
    given = envs.repro_commit()
    full = None if given else _git(repo, "rev-parse", "HEAD")
    if not full:  # given (the Docker image's build arg; a copy whose .git is stale), or unknown
        known = given not in ("", "unknown")
        return {"commit": given[:7] if known else "unknown", "commit_full": given if known else None,
                "dirty": None}
    # the benchmark's own outputs (results/) do not make the code dirty
    dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"))
    return {"commit": full[:7] + ("-dirty" if dirty else ""), "commit_full": full, "dirty": dirty}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    """Print one JSON line: this machine's hardware and versions."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m flexgen_repro.bench.records")
    p.add_argument("--offload-dir", default="~/flexllmgen_offload_dir")
    args = p.parse_args(argv)
    hw = local_hardware(args.offload_dir)
    ver = versions()
    ver["cuda"] = hw.get("cuda_version")
    print(json.dumps({"hardware": hw, "versions": ver}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
