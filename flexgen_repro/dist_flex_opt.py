"""`python -m flexgen_repro.dist_flex_opt`: the original FlexGen's pipeline-parallel benchmark.

Launched once per rank (`torchrun --nproc-per-node N -m flexgen_repro.dist_flex_opt ...`, or
with `--head-ip --port` and ranks from `--use-mpi` or `--rank --world-size --local-rank`). Each
rank holds a contiguous range of layers placed by the same policy flags as flex_opt; hidden
states cross between ranks over torch.distributed (NCCL between GPUs, gloo through host memory:
`--comm-device`), and `--num-inner-iterations` micro-batches of gpu_batch_size x num_gpu_batches
prompts are in flight. The last rank prints the original's log text and writes the JSON record,
with every rank's layers and placement.
"""
from __future__ import annotations

import datetime
import gc
import platform
import sys
import time

import torch

from flexgen_repro import envs
from flexgen_repro.config import get_opt_config
from flexgen_repro.devices.env import ExecutionEnv
from flexgen_repro.parallel import pipeline
from flexgen_repro.parallel.link import StageLink
from flexgen_repro.parallel.stage import StageLM, split_stages
from flexgen_repro.parallel.world import (COMM_DEVICES, World, backend_for, barrier, comm_torch_device,
                                      compute_device, gather_objects, init_method, process_group,
                                      world_from_env)
from flexgen_repro.flex_opt import (auto_log_file, build_parser, device_name, options_from_args,
                                    policy_from_args, synthetic_prompts)
from flexgen_repro.metrics import GB, PeakMemory, RunMetrics, log_text, write_outputs
from flexgen_repro.model.weight_home import DUMMY


def dist_parser():
    p = build_parser()
    p.prog = "python -m flexgen_repro.dist_flex_opt"
    p.description = __doc__.split("\n")[0]
    p.add_argument("--head-ip", default=None, help="rendezvous host (default: torchrun's MASTER_ADDR)")
    p.add_argument("--port", type=int, default=None, help="rendezvous port (with --head-ip)")
    p.add_argument("--rank", type=int, default=None, metavar="I")
    p.add_argument("--local-rank", type=int, default=None, metavar="I")
    p.add_argument("--world-size", type=int, default=None, metavar="N")
    p.add_argument("--use-mpi", action="store_true", help="ranks from Open MPI's variables")
    p.add_argument("--comm-device", choices=COMM_DEVICES, default="gpu",
                   help="gpu: NCCL between GPUs; cpu: gloo through host memory")
    p.add_argument("--num-inner-iterations", type=int, default=None, metavar="M",
                   help="micro-batches in flight (default: the number of ranks)")
    p.add_argument("--async-comm", action="store_true",
                   help="post each receive ahead, so it lands while the rank computes")
    return p


def stage_record(world: World, lm: StageLM, peak: PeakMemory, device: str) -> dict:
    """What one rank reports: its layers, placement, times and memory."""
    return dict(rank=world.rank, device=device, host=platform.node(),
                decoder_layers=[lm.stage.first_layer, lm.stage.stop_layer],
                embedding=lm.stage.first, output_head=lm.stage.last,
                weight_placement=lm.weight_placement, prefill_s=lm.times.prefill_s,
                decode_s=lm.times.decode_s, peak_gpu_mem_gb=peak.gpu_peak_bytes / GB,
                peak_cpu_mem_gb=peak.cpu_peak_bytes / GB)


def run_stage(args, world: World) -> tuple[dict, list[dict]]:
    """This rank's part of the benchmark: (run facts, every rank's stage record)."""
    config = get_opt_config(args.model, dtype=args.dtype)
    policy = policy_from_args(args, config)
    options = options_from_args(args)
    micro = world.size if args.num_inner_iterations is None else args.num_inner_iterations
    stage = split_stages(config.num_hidden_layers, world.size)[world.rank]
    device = compute_device(world)
    if device != "cpu":  # streams, peak memory and kernels use the current device
        torch.cuda.set_device(device)
    if args.gpu_mem_gb and device != "cpu":
        total = torch.cuda.get_device_properties(world.local_rank).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem_gb * GB / total),
                                                   device=world.local_rank)
    prompts = synthetic_prompts(micro * policy.block_size, args.prompt_len, config.vocab_size, args.seed)
    with ExecutionEnv.create(args.offload_dir, gpu_device=device, options=options) as env:
        link = StageLink(world, comm_torch_device(args.comm_device, world), env.gpu.dev,
                         args.async_comm)
        lm = StageLM(config, env, args.path, policy, stage, micro, options)
        if args.warmup:  # prefill only, with the full run's buffers (kept for it)
            pipeline.generate(lm, link, prompts, args.gen_len, max_steps=1)
        gc.collect()
        gc.freeze()
        barrier(world)
        with PeakMemory() as peak:
            pipeline.generate(lm, link, prompts, args.gen_len)
    stages = gather_objects(world, stage_record(world, lm, peak, device_name()))
    return dict(config=config, policy=policy, options=options, micro=micro, lm=lm), stages


def build_record(args, world: World, facts: dict, stages: list[dict]) -> dict:
    """The JSON record (the last rank's times, as the original reports them)."""
    config, policy, lm = facts["config"], facts["policy"], facts["lm"]
    num_prompts = facts["micro"] * policy.block_size
    metrics = RunMetrics(num_prompts, args.prompt_len, args.gen_len, lm.times.prefill_s,
                         lm.times.decode_s, max(s["peak_gpu_mem_gb"] for s in stages),
                         max(s["peak_cpu_mem_gb"] for s in stages))
    sizes = (config.model_bytes(), config.cache_bytes(num_prompts, args.prompt_len + args.gen_len),
             config.hidden_bytes(num_prompts, args.prompt_len + args.gen_len))
    record = dict(
        model=config.name, path="_DUMMY_" if args.path == DUMMY else args.path,
        percent=" ".join(f"{v:g}" for v in policy.percent), gpu_batch_size=policy.gpu_batch_size,
        num_gpu_batches=policy.num_gpu_batches, num_inner_iterations=facts["micro"],
        world_size=world.size, comm_device=args.comm_device, backend=backend_for(args.comm_device),
        async_comm=args.async_comm, compress_weight=policy.compress_weight,
        compress_cache=policy.compress_cache, cpu_cache_compute=policy.cpu_cache_compute,
        overlap=policy.overlap, sep_layer=policy.sep_layer, pin_weight=policy.pin_weight,
        attn_sparsity=policy.attn_sparsity, dtype=args.dtype, model_size_gb=sizes[0] / GB,
        cache_size_gb=sizes[1] / GB, hidden_size_gb=sizes[2] / GB, stages=stages,
        device=stages[-1]["device"], torch_version=torch.__version__,
        python_version=platform.python_version(), commit=envs.checkout_commit(), measured=True,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metrics.as_dict())
    record["log_text"] = log_text(metrics, *sizes)
    return record


def report(args, record: dict) -> None:
    """The log text and placement on stdout; the log file and JSON record written."""
    if args.verbose >= 1:
        print(record["log_text"])
        for s in record["stages"]:
            placed = ", ".join(f"{t} {p:.1f}%" for t, p in s["weight_placement"].items())
            print(f"rank {s['rank']}: decoder layers {s['decoder_layers'][0]}-"
                  f"{s['decoder_layers'][1] - 1}, weights placed: {placed}")
    log_file = (auto_log_file(record, f"rank-{record['world_size'] - 1}-") if args.log_file == "auto"
                else args.log_file)
    write_outputs(record, f"model: {record['model']}, percent: {record['percent']}, gpu batch: "
                          f"{record['gpu_batch_size']}x{record['num_gpu_batches']}x"
                          f"{record['num_inner_iterations']}, ranks: {record['world_size']}",
                  log_file, args.json_file)


def main(argv=None) -> int:
    envs.use_expandable_segments()  # before CUDA is first touched
    args = dist_parser().parse_args(argv)
    try:
        world = world_from_env(args.use_mpi, args.rank, args.world_size, args.local_rank)
        rendezvous = init_method(args.head_ip, args.port)
        with process_group(world, backend_for(args.comm_device), rendezvous):
            t0 = time.perf_counter()
            facts, stages = run_stage(args, world)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if world.last:
        report(args, build_record(args, world, facts, stages))
        if args.verbose >= 2:
            print(f"[dist_flex_opt] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
