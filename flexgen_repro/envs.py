"""Every environment variable the package reads, outside the storage tiers (devices/), in one
place: name -> a small reader, called when the value is needed, never at import.

Settings of a run are `RuntimeOptions` fields (options.py) and command-line flags, not variables
here; this list holds only what must come from the environment of the process:

- FLEXGEN_REPRO_COMMIT: the commit a benchmark record names, for a copy of the tree whose .git is
  absent or stale (a machine the tree was copied to). Unset: `git rev-parse` of the checkout.
- FLEXGEN_KERNEL_CACHE: the folder where kernels/cpu_attention.c is compiled to, once per source,
  flags and CPU (default ~/.cache/flexgen_repro/kernels).
- CC: the C compiler that builds it (default: cc, else gcc, from PATH).

One variable is written, not read: PYTORCH_CUDA_ALLOC_CONF, which the benchmark command's
`main()` sets (where the user has not) before anything touches CUDA (`use_expandable_segments`).

Callers use the named readers (`envs.repro_commit()`, ...) or `envs.get(NAME)`.
"""
from __future__ import annotations

import os
from typing import Callable

READERS: dict[str, Callable[[], object]] = {
    # commit of the running tree for benchmark records; "" where unset
    "FLEXGEN_REPRO_COMMIT": lambda: os.environ.get("FLEXGEN_REPRO_COMMIT", ""),
    # where the CPU attention kernel is built and kept
    "FLEXGEN_KERNEL_CACHE": lambda: os.path.expanduser(
        os.environ.get("FLEXGEN_KERNEL_CACHE", "~/.cache/flexgen_repro/kernels")),
    # the C compiler for that kernel; None: look for cc or gcc
    "CC": lambda: os.environ.get("CC") or None,
}


def get(name: str):
    """The current value of environment variable `name` (one of READERS)."""
    if name not in READERS:
        raise KeyError(f"{name} is not a setting read from the environment; known: {sorted(READERS)}")
    return READERS[name]()


def repro_commit() -> str:
    """FLEXGEN_REPRO_COMMIT: the commit to record ("" where unset)."""
    return get("FLEXGEN_REPRO_COMMIT")


def checkout_commit() -> str:
    """The commit a record names: repro_commit() where set, else the checkout's short commit
    ("-dirty" with uncommitted changes to tracked files), else "unknown"."""
    if repro_commit():
        return repro_commit()
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def kernel_cache() -> str:
    """FLEXGEN_KERNEL_CACHE: the folder compiled kernels are kept in."""
    return get("FLEXGEN_KERNEL_CACHE")


def c_compiler() -> str | None:
    """CC: the C compiler to build kernels with (None: look one up)."""
    return get("CC")


# Less fragmentation under a GPU memory cap: layers and caches of many sizes come and go.
CUDA_ALLOC_CONF = "expandable_segments:True"


def use_expandable_segments() -> None:
    """Set PYTORCH_CUDA_ALLOC_CONF to CUDA_ALLOC_CONF unless the user set it. CUDA's allocator
    reads it once, at its first allocation: call this before anything touches CUDA."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
