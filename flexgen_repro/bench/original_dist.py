"""The original FlexGen's pipeline-parallel benchmark as a baseline, one rank per process:
`torchrun --nproc-per-node N -m flexgen_repro.bench.original_dist ...`.

It drives the published package's `flexgen.dist_flex_opt` (PyPI `flexgen` 0.1.8) without copying
it: each rank passes torchrun's rank, world size and rendezvous host to the original's own
`initialize_distributed` (its `--head-ip --port --rank --local-rank --world-size`, on a port next
to torchrun's), tokenizes with original.py's stand-in (the GPU machine cannot reach the hub), and
runs `run_flexgen_dist`. The last rank turns the original's timers (`generate-prompt`, `generate`:
summed, as its own log line sums them) into our record.
"""
from __future__ import annotations

import argparse
import os
import sys

from flexgen_repro.bench import baselines
from flexgen_repro.bench.original import PACKAGE_VERSION, PromptIds, build_parser, original_argv
from flexgen_repro.config import get_opt_config
from flexgen_repro.metrics import GB
from flexgen_repro.parallel.world import world_from_env

# The original's process group gets its own port: torchrun's MASTER_PORT + PORT_OFFSET
PORT_OFFSET = 1


def dist_argv(args, world, log_file: str) -> list[str]:
    """The original's dist_flex_opt command line for this rank."""
    port = int(os.environ.get("MASTER_PORT", "29500")) + PORT_OFFSET
    argv = original_argv(args, log_file)
    argv += ["--head-ip", os.environ.get("MASTER_ADDR", "127.0.0.1"), "--port", str(port),
             "--rank", str(world.rank), "--local-rank", str(world.local_rank),
             "--world-size", str(world.size), "--comm-device", args.comm_device]
    if args.num_inner_iterations:
        argv += ["--num-inner-iterations", str(args.num_inner_iterations)]
    return argv + (["--async-comm"] if args.async_comm else [])


def _parse(dfo, argv: list[str]):
    parser = argparse.ArgumentParser()
    from flexgen.flex_opt import add_parser_arguments
    add_parser_arguments(parser)
    dfo.add_distributed_parser_arguments(parser)
    return parser.parse_args(argv)


def run(args) -> dict | None:
    """This rank's part; the record on the last rank, None elsewhere."""
    import torch

    import flexgen.dist_flex_opt as dfo
    from flexgen.dist_utils import initialize_distributed
    if not torch.cuda.is_available():
        raise ValueError("the original FlexGen needs CUDA GPUs")
    world = world_from_env()
    log_file = f"{args.log_prefix}.rank{world.rank}.log"
    dargs = _parse(dfo, dist_argv(args, world, log_file))
    if args.gpu_mem_gb:
        total = torch.cuda.get_device_properties(world.local_rank).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem_gb * GB / total),
                                                   device=world.local_rank)
    saved = dfo.AutoTokenizer, getattr(dfo, "args", None)
    dfo.AutoTokenizer, dfo.args = PromptIds, dargs  # its comm_test reads the module's `args`
    try:
        initialize_distributed(dargs.head_ip, dargs.port, dargs.world_size, dargs.rank,
                               dargs.local_rank, dargs.comm_device)
        torch.cuda.reset_peak_memory_stats()
        dfo.run_flexgen_dist(dargs)
    finally:
        dfo.AutoTokenizer, dfo.args = saved
    if not world.last:
        return None
    prefill_s = sum(dfo.timers("generate-prompt").costs)
    decode_s = sum(dfo.timers("generate").costs)
    micro = args.num_inner_iterations or world.size
    config = get_opt_config(args.model)
    extra = dict(system="original-flexgen-dist", world_size=world.size, num_inner_iterations=micro,
                 comm_device=args.comm_device, async_comm=args.async_comm,
                 gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
                 requested_percent=" ".join(str(p) for p in args.percent),
                 percent=" ".join(str(p) for p in args.percent),
                 placement_note="weight placement as requested (the original's own rule applies)",
                 flexgen_version=PACKAGE_VERSION, torch_version=torch.__version__,
                 timing="the original's timers: prefill = sum of generate-prompt, decode = sum of generate")
    w_gpu, w_cpu = args.percent[0], args.percent[1]
    requested = {"gpu": w_gpu, "cpu": w_cpu, "disk": 100 - w_gpu - w_cpu}
    return baselines.build_record(config, args.gpu_batch_size * args.num_gpu_batches * micro,
                                  args.prompt_len, args.gen_len, prefill_s, decode_s, requested,
                                  torch.cuda.max_memory_allocated() / GB, 0.0,
                                  torch.cuda.get_device_name(0), extra)


def dist_build_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m flexgen_repro.bench.original_dist"
    p.add_argument("--comm-device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--num-inner-iterations", type=int, default=None)
    p.add_argument("--async-comm", action="store_true")
    p.add_argument("--log-prefix", default="original-dist", help="the original's log, per rank")
    return p


MISSING = (f"the original FlexGen baseline needs the `flexgen` package (pip install "
           f"flexgen=={PACKAGE_VERSION}; not in requirements.lock)")


def main(argv: list[str] | None = None) -> int:
    """Every rank runs its part; the last one prints and writes the record (as the original
    reports from its last rank)."""
    args = dist_build_parser().parse_args(argv)
    args.batch_size = args.gpu_batch_size * args.num_gpu_batches
    if world_from_env().last:
        return baselines.run_main(args, "flexgen", MISSING, run, "original-flexgen-dist",
                                  expandable_segments=False)
    try:
        run(args)
    except ImportError:
        print(f"error: {MISSING}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
