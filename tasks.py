"""invoke tasks: thin wiring over the package. `invoke --list` shows them; the logic lives in
flexgen_repro/ (and is tested there). Every parameter has a default, so that `invoke TASK --help`
prints the help: invoke would take `--help` as the value of a required positional parameter."""
from __future__ import annotations

import subprocess
import sys

from invoke import Exit, task


def _exit_on(code: int) -> None:
    if code:
        raise Exit(code=code)


def _required(**given: str) -> None:
    """Stop with exit code 2 naming the first required option left empty."""
    for name, value in given.items():
        if not value:
            raise Exit(f"error: --{name.replace('_', '-')} is required (see --help)", code=2)


@task(help={"cloud": "aws (one drive, xfs) or gcp (LVM stripe over all local NVMe drives, xfs)",
            "mount_path": "the offload folder is made at <mount-path>/flexllmgen_offload_dir (default ~)",
            "devices": "comma-separated drives to use instead of the detected ones (/dev/nvme1n1,...)",
            "dry_run": "print the exact commands and change nothing",
            "force": "allow a drive that holds a filesystem or partitions (never a mounted or root drive)"})
def setup_nvme(c, cloud="", mount_path="~", devices="", dry_run=False, force=False):
    """Mount the instance's local NVMe drives as the offload folder."""
    _required(cloud=cloud)
    from flexgen_repro import nvme
    _exit_on(nvme.main(cloud=cloud, mount_path=mount_path, devices=devices,
                       dry_run=dry_run, force=force))


@task(help={"model": "a known name (opt-1.3b, facebook/opt-30b, opt-175b, ...) or a local HF checkpoint folder",
            "path": "where <name>-np/ is written (default ~/opt_weights)",
            "source": "a local HF checkpoint folder of that model, or for opt-175b the folder of the 992 metaseq shards"})
def prepare_weights(c, model="", path="~/opt_weights", source=""):
    """Convert a checkpoint into the runtime's weight folder (streaming, resumable, verified)."""
    _required(model=model)
    from flexgen_repro.weights import prepare
    _exit_on(prepare.main(model=model, path=path, source=source or None))


@task(help={"model": "model name or checkpoint folder", "path": "weight root (default ~/opt_weights)"})
def verify_weights(c, model="", path="~/opt_weights"):
    """Check a weight folder against the model's expected shapes and its manifest."""
    _required(model=model)
    from flexgen_repro.weights import verify
    _exit_on(verify.main(model=model, path=path))


@task(help={"suite": "smoke, t4-paper, h100-anchors, ... (default: smoke without a GPU)",
            "gpu_mem_gb": "cap GPU memory (16 emulates the paper's T4 on a larger card)",
            "out": "where the suite's folder is written (default: a run folder "
                   "results/runs/<suite>-<date>-<commit>/, ignored by git)",
            "publish": "write into results/ itself (the committed records)",
            "allow_cpu": "run cases that need a GPU on a machine without one (hours for large models)",
            "path": "weight root for non-dummy cases",
            "offload_dir": "offload folder for disk tiers",
            "cases": "comma-separated case ids to run (default: all)",
            "profile": "bandwidth profile for the limit column (h100-reference, t4-paper, local, or a JSON file)",
            "baseline": "another checkout (e.g. `git worktree add ../base REV`): each flexgen case "
                        "also runs from it, as base-<case>, just before ours",
            "trace": "run flexgen cases with flex_opt --trace: a timeline per case in logs/, and "
                     "its busy seconds per thread and span in the record (trace_summary)"})
def bench(c, suite="", gpu_mem_gb=0.0, out="", path="~/opt_weights",
          offload_dir="~/flexllmgen_offload_dir", cases="", profile="", publish=False,
          allow_cpu=False, baseline="", trace=False):
    """Run a benchmark suite: one process per case; raw JSON, CSV, Markdown and a plot in a run folder."""
    from flexgen_repro.bench import runner
    _exit_on(runner.main(suite=suite or None, gpu_mem_gb=float(gpu_mem_gb) or None,
                         out=out or ("results" if publish else None), path=path,
                         offload_dir=offload_dir, cases=cases, profile=profile or None,
                         allow_cpu=allow_cpu, baseline=baseline or None, trace=trace))


@task(help={"out": "results folder to rebuild tables and plots in (default results/)",
            "add": "first copy in the records of this run folder (`invoke bench --out` wrote it); "
                   "a measurement already there is never overwritten"})
def results(c, out="results", add=""):
    """Rebuild every CSV, Markdown table and plot from the raw JSON records."""
    from flexgen_repro.bench import tables
    _exit_on(tables.main(out=out, add=add or None))


@task(help={"model": "model name", "hardware": "t4-paper, local, or a profile JSON file",
            "prompt_len": "prompt length", "gen_len": "generated tokens",
            "compress": "allow 4-bit compression of weights and cache",
            "evaluate": "predict this policy instead of searching (flex_opt flags in quotes)",
            "json": "print one JSON object", "gpu_mem_gb": "cap the profile's GPU memory"})
def policy(c, model="", hardware="t4-paper", prompt_len=512, gen_len=32, compress=False,
           evaluate="", json=False, gpu_mem_gb=0.0):
    """The cost model: the best policy for a machine, or the predicted throughput of a given one."""
    _required(model=model)
    from flexgen_repro.cost_model import cli
    _exit_on(cli.main(model=model, hardware=hardware, prompt_len=int(prompt_len),
                      gen_len=int(gen_len), compress=compress, evaluate=evaluate or None,
                      as_json=json, gpu_mem_gb=float(gpu_mem_gb) or None))


@task(help={"offload_dir": "folder on the drive used for disk offloading",
            "out": "where the profile JSON is written", "gpu_mem_gb": "cap the GPU memory recorded"})
def profile_hardware(c, offload_dir="~/flexllmgen_offload_dir", out="", gpu_mem_gb=0.0):
    """Measure this machine (bandwidths, matmul and attention rates, memory) into a profile."""
    from flexgen_repro.cost_model import profile
    _exit_on(profile.main(offload_dir=offload_dir, out=out or None,
                          gpu_mem_gb=float(gpu_mem_gb) or None))


@task(help={"task": "lambada or wikitext", "model": "model name or checkpoint folder",
            "path": "weight root", "compress_weight": "4-bit weights",
            "compress_cache": "4-bit KV cache", "data": "local data file (default: the bundled fixture or the hub)",
            "limit": "evaluate at most this many examples",
            "tokenizer": "tokenizer folder (default: --model's folder, else the hub's cache)"})
def eval(c, task="", model="", path="~/opt_weights", compress_weight=False, compress_cache=False,
         data="", limit=0, tokenizer=""):
    """Lambada last-word accuracy or WikiText perplexity through the runtime."""
    _required(task=task, model=model)
    from flexgen_repro.eval import cli
    _exit_on(cli.main(task=task, model=model, path=path, compress_weight=compress_weight,
                      compress_cache=compress_cache, data=data or None, limit=int(limit) or None,
                      tokenizer=tokenizer or None))


@task(iterable=["stop"], auto_shortflags=False,
      help={"model": "a known name or a local checkpoint folder", "input": "JSONL, .txt or - (stdin)",
            "output": "output JSONL (a run record goes beside it)", "path": "weight root, or _DUMMY_",
            "percent": 'six numbers in quotes, or "auto" (the cost model)',
            "stop": "a string that ends a completion (repeat the flag for more)",
            "truncate": "left: keep the tail of prompts too long for the model",
            "hardware": "cost-model profile for --percent auto", "tokenizer": "tokenizer folder",
            "resume": "continue an existing output", "overwrite": "replace an existing output",
            "log_every": "seconds between progress updates",
            "gpus": "ranks on this node (torchrun), each with its own GPU and its shard of the input"})
def generate(c, input="", output="", model="", path="~/opt_weights", offload_dir="~/flexllmgen_offload_dir",
             percent="auto", gpu_batch_size=4, num_gpu_batches=1, max_new_tokens=32, temperature="0",
             top_p="1", seed=-1, stop=None, dtype="", truncate="", compress_weight=False,
             compress_cache=False, cpu_cache_compute=False, tokenizer="", hardware="", resume=False,
             overwrite=False, log_every="1", gpus=1, window=0):
    """Prompts in, completions out: the same as `python -m flexgen_repro.generate`."""
    _required(input=input, output=output)
    from flexgen_repro import generate as job
    argv = ["--input", input, "--output", output, "--path", path, "--offload-dir", offload_dir,
            "--percent", *percent.split(), "--gpu-batch-size", str(gpu_batch_size),
            "--num-gpu-batches", str(num_gpu_batches), "--max-new-tokens", str(max_new_tokens),
            "--temperature", str(temperature), "--top-p", str(top_p), "--log-every", str(log_every)]
    for flag, value in (("--model", model), ("--dtype", dtype), ("--truncate", truncate),
                        ("--tokenizer", tokenizer), ("--hardware", hardware)):
        argv += [flag, value] if value else []
    argv += ["--seed", str(seed)] if int(seed) >= 0 else []
    argv += ["--window", str(window)] if int(window) > 0 else []
    argv += ["--stop", *stop] if stop else []
    for flag, on in (("--compress-weight", compress_weight), ("--compress-cache", compress_cache),
                     ("--cpu-cache-compute", cpu_cache_compute), ("--resume", resume),
                     ("--overwrite", overwrite)):
        argv += [flag] if on else []
    if int(gpus) > 1:
        from flexgen_repro.parallel.shards import torchrun_command
        _exit_on(subprocess.run(torchrun_command(int(gpus), argv)).returncode)
        return
    _exit_on(job.main(argv))


@task
def test(c):
    """Run the test suite (the README's test command)."""
    c.run(f"{sys.executable} -m pytest -q -n 2", pty=False)
