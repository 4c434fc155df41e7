"""The orderings of the driver's steps: each says what one (token i, layer j, GPU batch k) step
queues, and in which order.

- NoOverlap: each step in turn, copies inline.
- OverlapOneBatch: the paper's single-batch overlap: while layer j computes, the next layer's
  weights and cache load on their own copy channels, and the previous layer's cache stores.
- OverlapBatches: the same over several GPU batches: one weight load serves every batch, and the
  next batch's cache loads while this one computes.
- GraphedPipeline: decode (tokens 1..) through captured CUDA graphs, each token queued before the
  previous one's ids are collected (everything on the GPU, or all but weights streamed from
  pinned host memory; prefill runs with one of the above).
"""
from __future__ import annotations

import time

from flexgen_repro import trace
from flexgen_repro.graph_decode import GraphedDecode

class NoOverlap:
    """load_weight, load_cache, compute (which stores the cache), one after the other."""

    def step(self, run, i: int, j: int, k: int) -> None:
        run.load_weight(j)
        run.load_cache(i, j, k)
        run.compute(i, j, k)


def _prefetch_weights(run, i: int, j: int) -> None:
    """The next run.prefetch_layers layers' weights (policy.prefetch_layers), wrapping to the first
    layers of token i + 1."""
    n_layers = len(run.layers)
    for ahead in range(j + 1, j + 1 + run.prefetch_layers):
        if ahead < n_layers:
            run.load_weight(ahead)
        elif i + 1 < run.gen_len and not run.graphed_decode:  # graphs load their own weights
            run.load_weight(ahead - n_layers)


class OverlapOneBatch:
    """One GPU batch: layer j computes while layer j + 1's weights and cache load."""

    def step(self, run, i: int, j: int, k: int) -> None:
        run.load_weight(j)                 # only the very first step waits for this
        run.load_cache(i, j, k)
        _prefetch_weights(run, i, j)
        if j + 1 < len(run.layers):        # the next layer's cache (same token only)
            run.load_cache(i, j + 1, 0)
        run.compute(i, j, k)


class OverlapBatches:
    """Several GPU batches: layer j's weights load once (at batch 0, with the next layers'),
    and batch k + 1's cache loads while batch k computes."""

    def step(self, run, i: int, j: int, k: int) -> None:
        run.load_weight(j)
        run.load_cache(i, j, k)
        if k == run.live_batches[0]:
            _prefetch_weights(run, i, j)
        later = [b for b in run.live_batches if b > k]
        nj, nk = (j, later[0]) if later else (j + 1, run.live_batches[0])
        if nj < len(run.layers):           # the next step's cache (same token only)
            run.load_cache(i, nj, nk)
        run.compute(i, j, k)


class GraphedPipeline:
    """Decode through captured CUDA graphs (one per GPU batch, or per layer and GPU batch where
    the weights stream), tokens queued back to back."""

    def __init__(self, graphs: GraphedDecode):
        self.graphs = graphs

    def decode(self, run, start: int) -> None:
        """Tokens start.. : each queued before the previous one's ids are collected, so the GPU
        never waits for the host between tokens. Stopping and max_steps are checked one token
        late; a token queued past the end is never collected (its column stays padding, as it
        would had it not run)."""
        run.wait_cache_stores()
        trace.set_phase("decode")
        end = min(run.gen_len, run.max_steps)
        t0 = time.perf_counter()
        prev = None
        for i in range(start, end + 1):
            if i < end:
                self.graphs.queue_token(i, run.live_batches)
            if prev is not None:
                self.graphs.collect(prev)
                run.finish_token(prev)
                now = time.perf_counter()
                run.step_times.append(now - t0)
                t0 = now
                if run.all_stopped():
                    break
            prev = i
        self.graphs.in_flight.clear()


def layer_strategy(policy):
    """The ordering of (token, layer, batch) steps for this policy."""
    if not policy.overlap:
        return NoOverlap()
    return OverlapOneBatch() if policy.num_gpu_batches == 1 else OverlapBatches()
