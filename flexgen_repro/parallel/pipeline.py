"""Pipeline-parallel generation: every stage walks the same order of (token i, micro-batch m),
running the block driver's strategy over its own layers for each; the hidden states of (i, m)
go to the next stage as soon as they are computed, and the last stage's picked ids go back to
the first stage for token i + 1.

So stage r works on micro-batch m while stage r + 1 works on m - 1: with at least as many
micro-batches as stages (`--num-inner-iterations`, default: the number of stages) every stage is
busy once the pipeline has filled, and the ids of (i, m) are back at the first stage before it
needs them for (i + 1, m).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from flexgen_repro import trace
from flexgen_repro.parallel.link import StageLink
from flexgen_repro.parallel.stage import StageLM, StageRun
from flexgen_repro.schedule import layer_strategy


def expected_messages(lm: StageLM, runs: list[StageRun], steps: int) -> list[tuple]:
    """(shape, dtype, source) of every message this stage receives, in order."""
    stage, link_prev = lm.stage, (lm.stage.rank - 1) % lm.stage.size
    out = []
    for i in range(steps):
        for run in runs:
            for _ in range(run.K):
                if not stage.first:
                    out.append((run.hidden_shape(i), lm.dtype, link_prev))
                elif i > 0 and stage.size > 1:
                    out.append(((run.B,), torch.int64, link_prev))
    return out


def _receive(run: StageRun, link: StageLink, i: int, inbox: list, at: int) -> int:
    """Fill run's inputs of token i from the messages list `inbox`, starting at index `at`."""
    for k in range(run.K):
        if link.alone or (run.stage.first and i == 0):
            return at
        then = inbox[at + 1] if at + 1 < len(inbox) else None
        got = link.receive(*inbox[at], then=then)
        at += 1
        if run.stage.first:
            run.record_ids(i - 1, k, got.cpu().numpy())
        else:
            run.inbox[k] = got
    return at


def _send(run: StageRun, link: StageLink, i: int, steps: int) -> None:
    """Token i's outputs of run onward: hidden states to the next stage, or (last stage) the
    picked ids to the first stage while it still needs them."""
    if link.alone:
        return
    for k in range(run.K):
        if not run.stage.last:
            link.send(run.outbox.pop(k), link.next)
        elif i + 1 < steps:
            link.send(run.ids(i, k), link.next)


def run_pipeline(lm: StageLM, runs: list[StageRun], link: StageLink, steps: int) -> tuple[float, float]:
    """Tokens 0..steps-1 of every micro-batch through this stage; (prefill_s, decode_s) on it."""
    strategy = layer_strategy(lm.policy)
    inbox = expected_messages(lm, runs, steps)
    at = 0
    t0 = time.perf_counter()
    prefill_end = t0
    for i in range(steps):
        trace.set_phase("prefill" if i == 0 else "decode")
        for run in runs:
            at = _receive(run, link, i, inbox, at)
            for j in range(len(run.layers)):
                for k in range(run.K):
                    strategy.step(run, i, j, k)
            _send(run, link, i, steps)
        if i == 0:
            prefill_end = time.perf_counter()
    for run in runs:
        run.drain()
    link.flush()
    return prefill_end - t0, time.perf_counter() - prefill_end


def apply_stop(out: np.ndarray, prompt_len: int, steps: int, stop: int | None, pad: int) -> None:
    """Rows that emitted `stop` hold the pad id after it (in place), as one process leaves them."""
    if stop is None:
        return
    stopped = np.zeros(out.shape[0], dtype=bool)
    for i in range(steps):
        col = prompt_len + i
        out[stopped, col] = pad
        stopped |= out[:, col] == stop


def _share_output(out: np.ndarray, link: StageLink) -> np.ndarray:
    """The last stage's ids, on every stage."""
    if link.alone:
        return out
    t = torch.from_numpy(out).to(link.comm)
    dist.broadcast(t, src=link.world.size - 1)
    return t.cpu().numpy()


def generate(lm: StageLM, link: StageLink, inputs, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, stop: int | None = None,
             seed: int | None = None, max_steps: int | None = None) -> np.ndarray:
    """OptLM.generate through the pipeline (every rank calls it with the same inputs): blocks of
    lm.pipeline_block prompts, each split into lm.micro_batches micro-batches. Every rank
    returns the ids (prompts, prompt_len + max_new_tokens)."""
    prompts, pick = lm.start(inputs, max_new_tokens, do_sample, temperature, seed)
    steps = max_new_tokens if max_steps is None else max(1, min(max_steps, max_new_tokens))
    size, micro = lm.pipeline_block, lm.policy.block_size
    outs = []
    with lm.env.computing(), trace.activate(lm.tracer):
        for start in range(0, prompts.shape[0], size):
            block = prompts[start:start + size]
            n = block.shape[0]
            block = np.concatenate([block, np.repeat(block[-1:], size - n, axis=0)])
            runs = [StageRun(lm, block[m * micro:(m + 1) * micro], max_new_tokens, pick, m)
                    for m in range(lm.micro_batches)]
            try:
                prefill_s, decode_s = run_pipeline(lm, runs, link, steps)
            finally:
                for run in runs:
                    run.close()
            lm.times.blocks += 1
            lm.times.prefill_s += prefill_s
            lm.times.decode_s += decode_s
            out = np.concatenate([run.output_ids for run in runs])
            apply_stop(out, prompts.shape[1], steps, stop, lm.config.pad_token_id)
            outs.append(_share_output(out, link)[:n])
    if lm.env.has_cuda:
        torch.cuda.current_stream().wait_stream(lm.env.compute_stream)
    return np.concatenate(outs, axis=0)
