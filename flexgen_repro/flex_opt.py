"""`python -m flexgen_repro.flex_opt`: the original FlexGen benchmark command line.

Runs a warm-up (prefill only), then the measured generation of gpu_batch_size x num_gpu_batches
prompts, prints the original's log text, appends it to --log-file when given (`auto`: the original's
file name, in the current folder) and writes the JSON record to --json-file when given. Every
argument is checked before any weight is read (exit code 2 with the fix).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import os
import platform
import sys
import time

import numpy as np
import torch

from flexgen_repro import envs
from flexgen_repro.config import get_model_config
from flexgen_repro.devices.env import ExecutionEnv
from flexgen_repro.graph_stream import StreamedGraphs, graph_kind
from flexgen_repro.metrics import GB, PeakMemory, RunMetrics, log_text, write_outputs
from flexgen_repro.model.weight_home import DUMMY
from flexgen_repro.opt_lm import OptLM
from flexgen_repro.options import DISK_IO_MODES, RuntimeOptions
from flexgen_repro.policy import CompressionConfig, Policy, parse_percent


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexgen_repro.flex_opt", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="facebook/opt-6.7b", help="model name or HF checkpoint folder")
    p.add_argument("--path", default="~/opt_weights",
                   help="folder holding <name>-np/, or _DUMMY_ for dummy weights")
    p.add_argument("--offload-dir", default="~/flexllmgen_offload_dir", help="disk tier folder")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=4)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--percent", nargs="+", default=["100", "0", "100", "0", "100", "0"],
                   help="w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu (the rest of each goes to "
                        "disk), or `auto` to use the cost model's choice")
    p.add_argument("--sep-layer", type=str2bool, nargs="?", const=True, default=True)
    p.add_argument("--pin-weight", type=str2bool, nargs="?", const=True, default=True,
                   help="keep host-resident weights in pinned memory (disk reads bound for the GPU "
                        "are staged in pinned buffers either way)")
    p.add_argument("--cpu-cache-compute", "--cpu", dest="cpu_cache_compute", action="store_true")
    p.add_argument("--attn-sparsity", type=float, default=1.0)
    p.add_argument("--compress-weight", action="store_true")
    p.add_argument("--compress-cache", action="store_true")
    p.add_argument("--overlap", type=str2bool, nargs="?", const=True, default=True)
    p.add_argument("--log-file", default=None,
                   help="append the text log here (default: none; `auto` names it after the run, "
                        "in the current folder, as the original does)")
    p.add_argument("--json-file", default=None, help="write the run's JSON record here")
    p.add_argument("--verbose", type=int, default=2)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--gpu-mem-gb", type=float, default=None,
                   help="cap this process's GPU memory (16 emulates the paper's T4)")
    p.add_argument("--hardware", default="local", help="cost-model profile for --percent auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--cuda-graphs", type=str2bool, nargs="?", const=True, default=True,
                   help="decode through CUDA graphs where everything is on the GPU, or all "
                        "but weights streamed from pinned host memory")
    p.add_argument("--profile", action="store_true",
                   help="print where each token's time went per kind of layer (synchronizes the GPU "
                        "after every layer: slows overlapped runs)")
    p.add_argument("--trace", metavar="FILE", default=None,
                   help="write a timeline of the measured generation (spans per thread) as JSON")
    p.add_argument("--disk-io", choices=DISK_IO_MODES, default="auto",
                   help="how the disk tier reads and writes its files")
    p.add_argument("--cpu-attention-threads", type=int, default=None, metavar="N",
                   help="threads of the CPU attention kernel (default: the cores less a reserve)")
    return p


def options_from_args(args) -> RuntimeOptions:
    """The runtime settings the flags describe."""
    return RuntimeOptions(cuda_graphs=args.cuda_graphs, disk_io=args.disk_io,
                          cpu_attention_threads=args.cpu_attention_threads, profile=args.profile,
                          trace_path=args.trace)


def check_args(args) -> None:
    """Every argument that can be wrong, checked before any weight is read: ValueError naming the
    fix (the model's positions, sizes, the policy, the weight folder, the output folders)."""
    config = get_model_config(args.model, dtype=args.dtype)
    for name in ("prompt_len", "gen_len", "gpu_batch_size", "num_gpu_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.prompt_len + args.gen_len > config.max_seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} + --gen-len {args.gen_len} exceeds "
                         f"{config.name}'s {config.max_seq_len} positions; shorten one of them")
    if args.gpu_mem_gb is not None and args.gpu_mem_gb <= 0:
        raise ValueError(f"--gpu-mem-gb must be > 0, got {args.gpu_mem_gb:g}")
    if [v.lower() for v in args.percent] != ["auto"]:
        policy_from_args(args, config)  # the Policy's own checks (percentages, sparsity, ...)
    weights = os.path.join(os.path.expanduser(args.path), f"{config.name}-np")
    if args.path != DUMMY and not os.path.isdir(weights):
        raise ValueError(f"no weight folder at {weights}: run `invoke prepare-weights --model "
                         f"{config.name} --path {args.path}` first, or pass --path {DUMMY}")
    for flag, file in (("--json-file", args.json_file), ("--log-file", args.log_file)):
        folder = os.path.dirname(os.path.abspath(file)) if file and file != "auto" else None
        if folder and not os.path.isdir(folder):
            raise ValueError(f"{flag} {file}: the folder {folder} does not exist; create it first")


def policy_from_args(args, config) -> Policy:
    comp = dict(compress_weight=args.compress_weight, compress_cache=args.compress_cache,
                comp_weight_config=CompressionConfig(4, 64, 0, False),
                comp_cache_config=CompressionConfig(4, 64, 2, False))
    if [v.lower() for v in args.percent] == ["auto"]:
        return _auto_policy(args, config)
    pct = parse_percent(args.percent)
    return Policy(gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
                  w_gpu_percent=pct[0], w_cpu_percent=pct[1], cache_gpu_percent=pct[2],
                  cache_cpu_percent=pct[3], act_gpu_percent=pct[4], act_cpu_percent=pct[5],
                  overlap=args.overlap, sep_layer=args.sep_layer, pin_weight=args.pin_weight,
                  cpu_cache_compute=args.cpu_cache_compute, attn_sparsity=args.attn_sparsity, **comp)


def _auto_policy(args, config) -> Policy:
    """The cost model's best policy for this machine's profile (the one place the CLI asks it)."""
    from flexgen_repro.cost_model.hardware import load_profile
    from flexgen_repro.cost_model.search import best_policy
    profile = load_profile(args.hardware)
    kwargs = {"gpu_mem_gb": args.gpu_mem_gb} if args.gpu_mem_gb else {}
    result = best_policy(config, profile, args.prompt_len, args.gen_len,
                         compress=args.compress_weight or args.compress_cache, **kwargs)
    print(f"--percent auto chose: {result.policy} (predicted {result.predicted_throughput:.2f} token/s)")
    args.predicted_throughput = result.predicted_throughput  # into the record
    return dataclasses.replace(result.policy, overlap=args.overlap, sep_layer=args.sep_layer,
                               pin_weight=args.pin_weight, attn_sparsity=args.attn_sparsity)


def _progress(args, text: str) -> None:
    if args.verbose >= 2:
        print(f"[flex_opt] {text}", file=sys.stderr, flush=True)


def synthetic_prompts(n: int, prompt_len: int, vocab: int, seed: int) -> np.ndarray:
    """Token ids for benchmarking (no tokenizer needed); no padding."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, min(vocab, 50000), size=(n, prompt_len), dtype=np.int64)


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"


@dataclasses.dataclass
class Prepared:
    """A run ready for its measured generation: weights at home, warmed up."""
    config: object
    policy: Policy
    options: RuntimeOptions
    env: ExecutionEnv
    lm: OptLM
    prompts: np.ndarray


@contextlib.contextmanager
def prepared(args):
    """The model of `args` on its environment, weights placed and warmed up, and its prompts;
    the environment closes on exit. `run` measures one generation of it; bench/alternate.py
    several, under other settings in turn."""
    config = get_model_config(args.model, dtype=args.dtype)
    if args.gpu_mem_gb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem_gb * GB / total))
    policy = policy_from_args(args, config)
    options = options_from_args(args)
    prompts = synthetic_prompts(policy.block_size, args.prompt_len, config.vocab_size, args.seed)
    t0 = time.perf_counter()
    with ExecutionEnv.create(args.offload_dir, options=options) as env:
        lm = OptLM(config, env, args.path, policy, options)
        _progress(args, f"weights at home in {time.perf_counter() - t0:.1f} s")
        if args.warmup:  # prefill only (buffers allocated for the full run and kept for it);
            graphed = args.cuda_graphs and graph_kind(policy, env, False) is not None  # or graphs
            lm.generate(prompts, max_new_tokens=args.gen_len, max_steps=None if graphed else 1)
            _progress(args, f"warm-up done at {time.perf_counter() - t0:.1f} s")
        # the weights, caches and the warm-up's objects stay alive for the whole run: take them
        # out of the cyclic collector's passes, which stop every thread (copy threads included)
        gc.collect()
        gc.freeze()
        yield Prepared(config, policy, options, env, lm, prompts)


def decode_graphs(lm: OptLM) -> str:
    """How the model's last generation decoded: "all-gpu" (graph_decode.py), "streamed-weights"
    (graph_stream.py) or "none" (the block driver's steps)."""
    graphs = list(lm.block_state.get("graphs", {}).values())
    if any(isinstance(g, StreamedGraphs) for g in graphs):
        return "streamed-weights"
    return "all-gpu" if graphs else "none"


def run(args) -> dict:
    with prepared(args) as ready:
        config, policy, options, env, lm = ready.config, ready.policy, ready.options, ready.env, ready.lm
        num_prompts = policy.block_size
        if lm.tracer is not None:  # --trace: the measured generation only
            lm.tracer.reset()
        with PeakMemory() as peak:
            lm.generate(ready.prompts, max_new_tokens=args.gen_len)
    if lm.tracer is not None:
        _report_trace(lm.tracer)
    metrics = RunMetrics(num_prompts, args.prompt_len, args.gen_len, lm.times.prefill_s,
                         lm.times.decode_s, peak.gpu_peak_bytes / GB, peak.cpu_peak_bytes / GB)
    sizes = (config.model_bytes(), config.cache_bytes(num_prompts, args.prompt_len + args.gen_len),
             config.hidden_bytes(num_prompts, args.prompt_len + args.gen_len))
    text = log_text(metrics, *sizes)
    record = dict(
        model=config.name, path="_DUMMY_" if args.path == DUMMY else args.path,
        percent=" ".join(f"{v:g}" for v in policy.percent), gpu_batch_size=policy.gpu_batch_size,
        num_gpu_batches=policy.num_gpu_batches, compress_weight=policy.compress_weight,
        compress_cache=policy.compress_cache, cpu_cache_compute=policy.cpu_cache_compute,
        overlap=policy.overlap, sep_layer=policy.sep_layer, pin_weight=policy.pin_weight,
        attn_sparsity=policy.attn_sparsity, dtype=args.dtype, gpu_mem_cap_gb=args.gpu_mem_gb,
        cuda_graphs=options.cuda_graphs, decode_graphs=decode_graphs(lm),
        disk_io=options.disk_io, disk_io_used=env.disk.describe(),
        disk_io_bytes=dict(env.disk.bytes_by_mode),
        cpu_attention_threads=options.cpu_attention_threads,
        staged_weights=not policy.pin_weight and env.has_cuda,
        model_size_gb=sizes[0] / GB, cache_size_gb=sizes[1] / GB, hidden_size_gb=sizes[2] / GB,
        weight_placement=lm.weight_placement, device=device_name(), torch_version=torch.__version__,
        python_version=platform.python_version(), commit=envs.checkout_commit(), measured=True,
        decode_step_s=lm.times.decode_steps, traced=lm.tracer is not None,
        allocator_events=peak.allocator_events, copy_polls=peak.copy_polls,
        predicted_throughput=getattr(args, "predicted_throughput", None),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metrics.as_dict())
    record["log_text"] = text
    if lm.tracer is not None:  # busy seconds per phase and thread/span of the measured generation
        record["trace_summary"] = {phase: {k: round(v, 4) for k, v in busy.items()}
                                   for phase, busy in lm.tracer.summary().items()}
    return record


def _report_trace(tracer) -> None:
    """Write the trace file (--trace) and print its busy seconds per phase."""
    tracer.dump()
    for phase, busy in tracer.summary().items():
        print(f"[trace] {phase}: " + ", ".join(f"{k} {v:.3f} s" for k, v in busy.items()),
              file=sys.stderr)


def auto_log_file(record: dict, prefix: str = "") -> str:
    """The original's log file name for a run (`--log-file auto`), after `prefix`."""
    return (f"{prefix}fo-{record['model']}-gbs{record['gpu_batch_size']}-ngbs{record['num_gpu_batches']}-"
            f"prompt{record['prompt_len']}-gen{record['gen_len']}-percent-"
            f"{record['percent'].replace(' ', '-')}.log")


def main(argv=None) -> int:
    envs.use_expandable_segments()  # before CUDA is first touched
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        record = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.verbose >= 1:
        print(record["log_text"])
        placed = ", ".join(f"{t} {p:.1f}%" for t, p in record["weight_placement"].items())
        print(f"weights placed: {placed}")
        if record["disk_io_bytes"]:  # the disk tier holds files
            print(f"disk tier: {record['disk_io_used']}")
    log_file = auto_log_file(record) if args.log_file == "auto" else args.log_file
    write_outputs(record, f"model: {record['model']}, percent: {record['percent']}, "
                          f"gpu batch: {record['gpu_batch_size']}x{record['num_gpu_batches']}",
                  log_file, args.json_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
