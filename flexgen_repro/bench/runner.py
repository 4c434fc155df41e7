"""`invoke bench`: run a suite's cases, each in its own process, into <out>/<suite>/.

<out> is a run folder, results/runs/<suite>-<date>-<commit>/ (ignored by git), unless --out names
one (`--out results` publishes into the committed records). Cases that need a GPU are refused up
front on a machine without one (unless allow_cpu). For every case: skip it (with the memory it
needs and the memory there is) when it cannot fit; otherwise run `python -m flexgen_repro.flex_opt`
(or a baseline) under a timeout, in its own process group, with its output in logs/<case>.log; then
merge the run's JSON record with the case's reference figure and ratio, the hardware limit, the
hardware, versions and commit, and write raw/<case>.json. Tables and the plot are rebuilt from raw/
at the end (tables.py). SIGINT or SIGTERM stops the running case's whole process group, removes
its partial record (its log stays, marked as stopped) and exits with 130 or 143.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from flexgen_repro.bench import fit, limits, multi_gpu, process, records, suites, tables, text_bench
from flexgen_repro.bench.suites import Case

DUMMY = "_DUMMY_"


@dataclass(frozen=True)
class Settings:
    """Where a run reads and writes, and the machine-wide GPU cap (overrides the suite's)."""
    out: str
    path: str
    offload_dir: str
    gpu_mem_gb: float | None = None
    python: str = sys.executable
    profile: str | None = None
    allow_cpu: bool = False
    baseline: str | None = None     # another source tree whose flexgen cases run as base-<case>
    baseline_git: dict | None = None  # its records.tree_state, resolved once by main
    trace: bool = False             # flexgen cases run with flex_opt --trace (logs/<case>.trace.json)

    def cap(self, case: Case) -> float | None:
        return self.gpu_mem_gb or case.gpu_mem_gb

    def weight_path(self, case: Case) -> str:
        return DUMMY if case.weights == "dummy" or self.path == DUMMY else self.path


CommandBuilder = Callable[[Case, Settings, str, str], list[str]]


def _flag(name: str, value: bool) -> list[str]:
    return [name, "true" if value else "false"]


def _policy_switches(case: Case) -> list[str]:
    """The policy's switches, as flex_opt and the original's driver both take them."""
    cmd = [*_flag("--overlap", case.overlap), *_flag("--sep-layer", case.sep_layer),
           *_flag("--pin-weight", case.pin_weight)]
    return cmd + [flag for flag, on in (("--cpu-cache-compute", case.cpu_cache_compute),
                                        ("--compress-weight", case.compress_weight),
                                        ("--compress-cache", case.compress_cache)) if on]


def flexgen_command(case: Case, s: Settings, json_file: str, log_file: str) -> list[str]:
    """The flex_opt command line of a case."""
    cmd = [s.python, "-m", "flexgen_repro.flex_opt", "--model", case.model,
           "--path", s.weight_path(case), "--offload-dir", s.offload_dir,
           "--prompt-len", str(case.prompt_len), "--gen-len", str(case.gen_len),
           "--percent", *case.percent.split()]
    if case.gpu_batch_size is not None:
        cmd += ["--gpu-batch-size", str(case.gpu_batch_size)]
    if case.num_gpu_batches is not None:
        cmd += ["--num-gpu-batches", str(case.num_gpu_batches)]
    cmd += _policy_switches(case)
    if case.attn_sparsity != 1.0:
        cmd += ["--attn-sparsity", f"{case.attn_sparsity:g}"]
    if case.dtype != "float16":
        cmd += ["--dtype", case.dtype]
    if s.cap(case):
        cmd += ["--gpu-mem-gb", f"{s.cap(case):g}"]
    if case.hardware:
        cmd += ["--hardware", case.hardware]
    if case.disk_io != "auto":
        cmd += ["--disk-io", case.disk_io]
    if s.trace:  # beside the case's other logs; the record carries its summary (trace_summary)
        cmd += ["--trace", json_file.removesuffix(".child.json") + ".trace.json"]
    return cmd + ["--json-file", json_file, "--log-file", log_file]


def accelerate_command(case: Case, s: Settings, json_file: str, log_file: str) -> list[str]:
    """The HF Accelerate baseline's command line (baselines.py)."""
    cmd = [s.python, "-m", "flexgen_repro.bench.baselines", "--model", case.model,
           "--prompt-len", str(case.prompt_len), "--gen-len", str(case.gen_len),
           "--batch-size", str(case.gpu_batch_size), "--offload-dir", s.offload_dir,
           "--dtype", case.dtype]
    if s.cap(case):
        cmd += ["--gpu-mem-gb", f"{s.cap(case):g}"]
    return cmd + ["--json-file", json_file, "--log-file", log_file]


def zero_inference_command(case: Case, s: Settings, json_file: str, log_file: str) -> list[str]:
    """The DeepSpeed ZeRO-Inference baseline's command line (zero_inference.py); compress_weight
    holds the weights 4-bit, pin_weight false leaves them in pageable memory."""
    cmd = [s.python, "-m", "flexgen_repro.bench.zero_inference", "--model", case.model,
           "--prompt-len", str(case.prompt_len), "--gen-len", str(case.gen_len),
           "--batch-size", str(case.gpu_batch_size), "--dtype", case.dtype,
           "--quant-bits", "4" if case.compress_weight else "0"]
    if not case.pin_weight:
        cmd.append("--no-pin")
    if s.cap(case):
        cmd += ["--gpu-mem-gb", f"{s.cap(case):g}"]
    return cmd + ["--json-file", json_file, "--log-file", log_file]


def original_command(case: Case, s: Settings, json_file: str, log_file: str) -> list[str]:
    """The original FlexGen's command line (original.py): the case's policy, percent verbatim."""
    cmd = [s.python, "-m", "flexgen_repro.bench.original", "--model", case.model,
           "--prompt-len", str(case.prompt_len), "--gen-len", str(case.gen_len),
           "--gpu-batch-size", str(case.gpu_batch_size),
           "--num-gpu-batches", str(case.num_gpu_batches), "--offload-dir", s.offload_dir,
           "--percent", *case.percent.split()]
    cmd += _policy_switches(case)
    if s.cap(case):
        cmd += ["--gpu-mem-gb", f"{s.cap(case):g}"]
    return cmd + ["--json-file", json_file, "--log-file", log_file]


def default_command(case: Case, s: Settings, json_file: str, log_file: str) -> list[str]:
    if case.runner in suites.DIST_RUNNERS:
        return multi_gpu.command(case, s, json_file, log_file)
    build = {"accelerate": accelerate_command, "deepspeed": zero_inference_command,
             "original": original_command,
             **{name: text_bench.command for name in suites.TEXT_RUNNERS}}.get(case.runner, flexgen_command)
    return build(case, s, json_file, log_file)


def _run_process(cmd: list[str], log_path: str, timeout_s: float,
                 tree: str = records.REPO_ROOT, commit: str | None = None) -> tuple[int | None, float]:
    """Run `cmd` in its own process group with output to `log_path` (process.run_logged),
    importing flexgen_repro from `tree`; `commit`: the commit its record names."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])))
    if commit:
        env["FLEXGEN_REPRO_COMMIT"] = commit
    return process.run_logged(cmd, log_path, timeout_s, env)


def is_baseline(case: Case) -> bool:
    return case.case.startswith(tables.BASELINE_PREFIX)


def with_baseline(cases: list[Case]) -> list[Case]:
    """Each flexgen case preceded by its twin base-<case>, run from the baseline tree: the two
    take turns in one call, so a change is measured against the code before it on one machine."""
    out = []
    for case in cases:
        if case.runner == "flexgen":
            out.append(dataclasses.replace(case, case=tables.BASELINE_PREFIX + case.case))
        out.append(case)
    return out


def _tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:]).strip()


def case_fields(case: Case) -> dict:
    """The case's own columns, as a record has them before (or without) a run."""
    return {"suite": case.suite, "case": case.case, "index": case.index, "runner": case.runner,
            "model": case.model, "weights": case.weights, "prompt_len": case.prompt_len,
            "gen_len": case.gen_len, "percent": case.percent, "gpu_batch_size": case.gpu_batch_size,
            "num_gpu_batches": case.num_gpu_batches, "overlap": case.overlap,
            "sep_layer": case.sep_layer, "pin_weight": case.pin_weight,
            "cpu_cache_compute": case.cpu_cache_compute, "compress_weight": case.compress_weight,
            "compress_cache": case.compress_cache, "attn_sparsity": case.attn_sparsity,
            "dtype": case.dtype, "paper_throughput": case.paper_throughput,
            "paper_system": case.paper_system, "paper_measured": case.paper_measured,
            "paper_source": case.paper_source, "note": case.note}


def needs_gpu(case: Case) -> bool:
    """Whether a case is meant for a GPU: it caps GPU memory, or it runs a baseline."""
    return case.gpu_mem_gb is not None or case.runner != "flexgen"


def _missing_package(case: Case) -> str | None:
    """Why a baseline case cannot run in this Python (its package is not installed), or None."""
    if case.runner == "accelerate" and importlib.util.find_spec("accelerate") is None:
        return ("HF Accelerate is not installed in this Python (`python3 -m pip install --require-hashes "
                "-r requirements.lock` installs it): the baseline cannot run here")
    if case.runner == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return ("DeepSpeed is not installed in this Python (not in requirements.lock; "
                "`DS_BUILD_OPS=0 python3 -m pip install deepspeed==0.19.8` installs it): the baseline "
                "cannot run here")
    if case.runner in ("original", "original-dist") and importlib.util.find_spec("flexgen") is None:
        return ("the original FlexGen (`flexgen` on PyPI) is not installed in this Python (not in "
                "requirements.lock; `python3 -m pip install flexgen==0.1.8 attrs` installs it): "
                "the baseline cannot run here")
    return None


def why_not_run(case: Case, s: Settings, hardware: dict) -> str | None:
    """The reason a case is skipped (a baseline not installed, no GPU, missing weights, or not
    enough memory), or None."""
    missing = _missing_package(case)
    if missing:
        return missing
    if needs_gpu(case) and not hardware.get("cuda_available") and not s.allow_cpu:
        return (f"needs a GPU and this machine has none (`invoke bench --suite {case.suite} "
                f"--allow-cpu` runs it on the CPU anyway: hours for models this size)")
    if case.runner in ("flexgen-dist", "original-dist"):
        return None  # each rank places its own layers; a run that does not fit fails
    weights = s.weight_path(case)
    if weights != DUMMY:
        folder = os.path.join(weights, f"{case.config().name}-np")
        if not os.path.isdir(folder):
            return (f"weights not found at {folder}: run `invoke prepare-weights --model {case.model} "
                    f"--path {weights}` first, or pass --path {DUMMY} for dummy weights")
    avail = fit.machine_available(hardware, s.cap(case), s.offload_dir)
    return fit.skip_reason(fit.case_needs(case), avail)


def run_case(case: Case, s: Settings, build: CommandBuilder = default_command) -> dict:
    """Run one case in its own process; the record is its JSON plus status (ok / failed) and reason."""
    logs = os.path.join(s.out, case.suite, "logs")
    os.makedirs(logs, exist_ok=True)
    json_file = os.path.join(logs, f"{case.case}.child.json")
    log_file = os.path.join(logs, f"{case.case}.log")
    child_log = os.path.join(logs, f"{case.case}.flexgen.log")
    if os.path.exists(json_file):
        os.remove(json_file)
    cmd = build(case, s, json_file, child_log)
    tree, commit = records.REPO_ROOT, None
    if is_baseline(case) and s.baseline:
        tree, commit = s.baseline, s.baseline_git["commit_full"]
    try:
        rc, wall = _run_process(cmd, log_file, case.timeout_s, tree, commit)
    except process.Interrupted as e:
        if os.path.exists(json_file):   # a torn record is never read as a result
            os.remove(json_file)
        for log in (log_file, child_log):   # the logs stay, to say how far the run got
            if os.path.exists(log):
                with open(log, "a") as f:
                    f.write(f"\n[bench] interrupted ({e}): this run was stopped; it left no record\n")
        raise
    out = {"command": cmd, "wall_s": round(wall, 2), "log": os.path.relpath(log_file, s.out)}
    if rc is None:
        return {**out, "status": "failed", "reason": f"timed out after {case.timeout_s:g} s",
                "log_tail": _tail(log_file)}
    if rc != 0 or not os.path.exists(json_file):
        tail = _tail(log_file)
        last = tail.splitlines()[-1] if tail else ""
        what = f"exit code {rc}" if rc else "no JSON record written"
        return {**out, "status": "failed", "reason": f"{what}: {last}", "log_tail": tail}
    with open(json_file) as f:
        child = json.load(f)
    os.remove(json_file)
    return {**child, **out, "status": "ok", "reason": ""}


def merge(case: Case, run: dict, context: dict, bw: limits.Bandwidths | None) -> dict:
    """The raw record: case fields, then the run's figures, then reference ratio, limit and context."""
    record = {**case_fields(case), **run}
    for key in ("suite", "case", "index", "runner", "weights", "paper_throughput", "paper_system",
                "paper_measured", "paper_source", "note"):
        record[key] = case_fields(case)[key]  # the suite's, never a child's field of the same name
    record.update(context["git"], hardware=context["hardware"], versions=context["versions"],
                  timestamp=records.utc_now(), measured=record["status"] == "ok",
                  gpu_mem_cap_gb=context["cap"], device=run.get("device") or context["device"])
    ours, paper = record.get("total_throughput"), case.paper_throughput
    record["ratio"] = ours / paper if ours and paper else None
    record.update(limit_throughput=None, fraction_of_limit=None, binding_term=None,
                  limit_terms=None, limit_profile=None)
    if record["status"] == "ok" and bw is not None:
        lim = limits.record_limit(record, bw)
        decode = record.get("decode_throughput")
        record.update(limit_throughput=lim.throughput, binding_term=lim.binding,
                      limit_terms=lim.terms, limit_profile=bw.name,
                      fraction_of_limit=decode / lim.throughput if decode and lim.throughput else None)
    return record


def _summary(i: int, n: int, r: dict) -> str:
    head = f"[{i}/{n}] {r['case']}: "
    if r["status"] != "ok":
        return head + f"{r['status']}: {r['reason']}"
    text = f"{r['total_throughput']:.2f} tok/s total, {r['decode_throughput']:.2f} decode"
    if r.get("ratio"):
        text += f", {r['ratio']:.2f}x the reference {r['paper_throughput']:g}"
    if r.get("fraction_of_limit"):
        text += f", {100 * r['fraction_of_limit']:.0f}% of the {r['binding_term']} limit"
    return head + text + f" ({r['wall_s']:.1f} s)"


def run_suite(cases: list[Case], s: Settings, context: dict, build: CommandBuilder = default_command,
              bw: limits.Bandwidths | None = None) -> list[dict]:
    """Run (or skip) each case, writing raw/<case>.json as it goes; returns the records."""
    raw = os.path.join(s.out, cases[0].suite, "raw")
    os.makedirs(raw, exist_ok=True)
    out = []
    for i, case in enumerate(cases, 1):
        case = dataclasses.replace(case, case=tables.free_record_name(raw, case.case))  # logs too
        reason = why_not_run(case, s, context["hardware"])
        ctx = {**context, "cap": s.cap(case)}
        if is_baseline(case) and s.baseline:
            ctx["git"] = s.baseline_git
        if reason:
            run = {"status": "skipped", "reason": reason}
        else:
            run = run_case(case, s, build)
        record = merge(case, run, ctx, bw)
        with open(os.path.join(raw, f"{case.case}.json"), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
        print(_summary(i, len(cases), record), flush=True)
        out.append(record)
    return out


def default_suite(hardware: dict) -> tuple[str, tuple[str, ...]]:
    """What `invoke bench` runs without --suite: smoke on a machine without a GPU, else a short
    dummy-weight subset of h100-anchors (suites.DEFAULT_GPU_CASES)."""
    if hardware.get("cuda_available"):
        return suites.DEFAULT_GPU_SUITE, suites.DEFAULT_GPU_CASES
    return suites.DEFAULT_CPU_SUITE, ()


def run_folder(suite: str, git: dict, now: datetime.datetime | None = None) -> str:
    """results/runs/<suite>-<UTC date and time>-<commit>: a user's run, ignored by git."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return os.path.join("results", "runs", f"{suite}-{now:%Y%m%d-%H%M%S}-{git['commit']}")


def check_baseline(tree: str) -> tuple[str, dict]:
    """The baseline tree as an absolute path and its commit (records.tree_state), after checking
    it holds the package (ValueError naming the fix otherwise)."""
    tree = os.path.abspath(os.path.expanduser(tree))
    if not os.path.isfile(os.path.join(tree, "flexgen_repro", "flex_opt.py")):
        raise ValueError(f"--baseline {tree}: no flexgen_repro package there; give the root of "
                         f"another checkout (`git worktree add {tree} REV`)")
    if tree == os.path.abspath(records.REPO_ROOT):
        raise ValueError("--baseline names this tree itself; give another checkout")
    return tree, records.tree_state(tree)


def _prepare(suite: str | None, gpu_mem_gb: float | None, cases: str, offload_dir: str,
             profile: str | None, probe: Callable[[str], dict]) -> tuple:
    """Validate the input and probe the machine: (suite, selected cases, probed, bandwidths)."""
    if gpu_mem_gb is not None and gpu_mem_gb <= 0:
        raise ValueError(f"--gpu-mem-gb must be > 0, got {gpu_mem_gb:g}")
    if suite:
        suites.suite_file(suite)  # an unknown name fails before the probe
    os.makedirs(offload_dir, exist_ok=True)
    probed = probe(offload_dir)
    if not suite:
        suite, default_cases = default_suite(probed["hardware"])
        cases = cases or ",".join(default_cases)
        print(f"no --suite given: running {suite!r}" + (f" cases {cases}" if cases else ""))
    selected = suites.select_cases(suites.load_suite(suite), cases)
    multi_gpu.check_gpus(selected, probed["hardware"])
    return suite, selected, probed, limits.resolve_bandwidths(probed["hardware"], profile)


def _report(results: list[dict], out: str, suite: str) -> int:
    """The exit code of a finished suite, with what went wrong on stderr."""
    failed = [r["case"] for r in results if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)} (see {out}/{suite}/logs/)",
              file=sys.stderr)
        return 1
    if results and all(r["status"] == "skipped" for r in results):
        reasons = sorted({r["reason"] for r in results})
        print(f"every case of {suite} was skipped, nothing was measured: " + "; ".join(reasons),
              file=sys.stderr)
        return 1
    return 0


def main(suite: str | None, gpu_mem_gb: float | None, out: str | None, path: str,
         offload_dir: str, cases: str = "", *, build: CommandBuilder = default_command,
         profile: str | None = None, probe: Callable[[str], dict] = records.probe,
         allow_cpu: bool = False, baseline: str | None = None, trace: bool = False) -> int:
    """Run a suite into `out`/<suite>/ (default: a run folder); 0 when cases ran or were skipped,
    1 when one failed or all were skipped, 2 on bad input, 130/143 when interrupted. `baseline`:
    another source tree; each flexgen case runs from it too, as base-<case>, just before ours.
    `trace`: flexgen cases run with flex_opt --trace; each record gets the trace's summary."""
    offload_dir = os.path.abspath(os.path.expanduser(offload_dir))
    path = path if path == DUMMY else os.path.abspath(os.path.expanduser(path))
    try:
        baseline, baseline_git = check_baseline(baseline) if baseline else (None, None)
        suite, selected, probed, bw = _prepare(suite, gpu_mem_gb, cases, offload_dir, profile, probe)
    except (ValueError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if baseline:
        selected = with_baseline(selected)
    hw = probed["hardware"]
    context = {"hardware": hw, "versions": probed["versions"], "git": records.git_state(),
               "device": hw.get("device") or hw.get("gpu_name") or "cpu"}
    out = out or run_folder(suite, context["git"])
    settings = Settings(out=out, path=path, offload_dir=offload_dir, gpu_mem_gb=gpu_mem_gb,
                        profile=profile, allow_cpu=allow_cpu, baseline=baseline,
                        baseline_git=baseline_git, trace=trace)
    limit_text = f"limits from the {bw.name!r} profile" if bw else \
        "no limit columns (no GPU bandwidth profile: `invoke profile-hardware` on a GPU machine)"
    print(f"suite {suite}: {len(selected)} case(s) on {context['device']} into {out}/{suite}/; "
          f"{limit_text}")
    refused = [c.case for c in selected if needs_gpu(c) and not hw.get("cuda_available")]
    if refused and not allow_cpu:
        print(f"no GPU here: {len(refused)} case(s) that need one are skipped "
              f"(`invoke bench --suite {suite} --allow-cpu` runs them on the CPU)", file=sys.stderr)
    try:
        with process.stop_on_signals():
            results = run_suite(selected, settings, context, build, bw)
    except process.Interrupted as e:
        print(f"interrupted ({e}): the running case was stopped and left no record (its log is in "
              f"{out}/{suite}/logs/); finished cases' records are in {out}/{suite}/raw/",
              file=sys.stderr)
        return e.exit_code
    written = tables.write_suite(os.path.join(out, suite))
    written += multi_gpu.write_scaling(os.path.join(out, suite))
    print("wrote " + ", ".join(written))
    return _report(results, out, suite)
