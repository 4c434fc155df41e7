"""Several ranks of one process group on the CPU (gloo), for the multi-GPU tests: a forkserver
that has imported torch and the package once forks every rank, so a group starts in about a
second instead of one torch import per rank."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback

import numpy as np

RANK_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "flexgen_repro.parallel.pipeline", "flexgen_repro.opt_lm"])
    return ctx


def _entry(fn, rank: int, size: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    import torch
    torch.set_num_threads(1)
    try:
        queue.put((rank, fn(rank, size, *args), None))
    except BaseException:  # reported to the test, which fails with it
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(fn, size: int, *args) -> list:
    """fn(rank, size, *args) in `size` processes of one gloo group; the results in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, size, port, args, queue)) for r in range(size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            rank, value, error = queue.get(timeout=RANK_TIMEOUT_S)
            results[rank] = value
            if error:
                errors.append(f"rank {rank}:\n{error}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    assert not errors, "\n".join(errors)
    return [results[r] for r in range(size)]


def pipeline_rank(rank: int, size: int, ckpt: str, weights: str, cases: list[dict]) -> list[np.ndarray]:
    """Each case's pipelined generate on this rank (a policy per rank, micro-batches, stop)."""
    import torch

    from flexgen_repro import ExecutionEnv, Policy, get_model_config
    from flexgen_repro.parallel import pipeline
    from flexgen_repro.parallel.link import StageLink
    from flexgen_repro.parallel.stage import StageLM, split_stages
    from flexgen_repro.parallel.world import World, process_group
    world = World(rank, size, rank)
    config = get_model_config(ckpt, dtype=np.float32)
    outs = []
    with process_group(world, "gloo"):
        for case in cases:
            policy = Policy(**case["policies"].get(rank, case["policies"]["default"]))
            stage = split_stages(config.num_hidden_layers, size)[rank]
            with ExecutionEnv.create() as env:
                lm = StageLM(config, env, weights, policy, stage, case["micro"])
                link = StageLink(world, torch.device("cpu"), env.gpu.dev, case["async_comm"])
                outs.append(pipeline.generate(lm, link, case["prompts"], case["gen_len"],
                                              stop=case.get("stop")))
    return outs
