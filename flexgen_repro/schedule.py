"""One generation driver over (token i, layer j, GPU batch k), and the orderings of its steps.

Steps: load_weight (once per layer, shared by every GPU batch), load_cache, compute (which loads
and stores the hidden state), store_cache. Orderings:
- normal: each step in turn, copies inline: no overlap.
- overlap: while (i, j, k) computes, the next layer's weights and the next step's cache load on
  their own copy channels, and the previous step's cache stores on a third. With one GPU batch
  this is the paper's single-batch overlap; with several, one weight load serves every batch.
Dependencies are futures: compute waits for exactly the loads it needs, a cache load waits for the
store of the same (layer, batch), and a failed copy re-raises here.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from flexgen_repro import trace
from flexgen_repro import graph_decode
from flexgen_repro.graph_decode import GraphedDecode, graphable
from flexgen_repro.model.base import CachePart, Deferred, StepInfo
from flexgen_repro.model.host_stage import HostStage
from flexgen_repro.policy import Tier

MAX_PENDING_STORES = 2
# Layers whose weights load ahead of the one computing (overlap). Measured on an H200 (case C,
# OPT-30B with CPU attention, rounds 14-15): one 27-29 tok/s, two 23-24 tok/s (more copies queued
# ahead of the compute stream's small ones, and more GPU memory).
PREFETCH_LAYERS = max(1, int(os.environ.get("FLEXGEN_PREFETCH_LAYERS", "1")))  # env: A/B runs
# Weights cross in COPY_CHUNK_BYTES pieces so that the compute stream's small host->GPU copies
# (CPU attention's results, host activations) queue between them; the pieces cost link rate: 16 MiB
# two at a time reached 48.4 GB/s against 55.1 for one whole copy (stream probe, round 15, H200),
# which is where case D stood (90% of the pinned rate). `auto`: whole copies where a policy makes
# no such small copies (no CPU attention, cache and activations all on the GPU); `1` always; `0`
# never (pieces, as before).
WHOLE_WEIGHT_COPIES = os.environ.get("FLEXGEN_WHOLE_WEIGHT_COPIES", "auto")
if WHOLE_WEIGHT_COPIES not in ("auto", "0", "1"):
    raise ValueError(f"FLEXGEN_WHOLE_WEIGHT_COPIES={WHOLE_WEIGHT_COPIES!r}: use auto, 0 or 1")


def whole_weight_copies(policy) -> bool:
    """Whether this policy's weights go to the GPU as whole copies (WHOLE_WEIGHT_COPIES)."""
    if WHOLE_WEIGHT_COPIES != "auto":
        return WHOLE_WEIGHT_COPIES == "1"
    return (not policy.cpu_cache_compute and policy.cache_gpu_percent >= 100
            and policy.act_gpu_percent >= 100)


class BlockRun:
    """Generates `gen_len` tokens for one block of gpu_batch_size x num_gpu_batches prompts."""

    def __init__(self, lm, input_ids: np.ndarray, gen_len: int, pick, stop: int | None,
                 want_logits: bool = False, max_steps: int | None = None):
        self.lm, self.env, self.policy, self.config = lm, lm.env, lm.policy, lm.config
        self.layers, self.gen_len, self.pick, self.stop = lm.layers, gen_len, pick, stop
        self.want_logits = want_logits
        self.max_steps = gen_len if max_steps is None else max(1, min(max_steps, gen_len))
        self.B, self.K = self.policy.gpu_batch_size, self.policy.num_gpu_batches
        self.prompt_len = input_ids.shape[1]
        self.pad = self.config.pad_token_id
        self.output_ids = np.full((self.B * self.K, self.prompt_len + gen_len), self.pad, np.int64)
        self.output_ids[:, :self.prompt_len] = input_ids
        overlap = self.policy.overlap
        self.ch = {name: self.env.channel(name, overlap) for name in self.env.CHANNELS}
        self.weights: dict[int, Future] = {}
        self.cache_loads: dict[tuple[int, int], Future] = {}
        self.cache_stores: dict[tuple[int, int], Future] = {}
        self.cache_home: dict[tuple[int, int], tuple] = {}
        self.hidden: dict[int, object] = {}
        self.steps: dict[int, StepInfo] = {}
        self.stopped = np.zeros(self.B * self.K, dtype=bool)
        self.logits = np.zeros((self.B * self.K, self.prompt_len, self.config.vocab_size),
                               np.float32) if want_logits else None
        self.step_times: list[float] = []
        self.pending_stores: deque[Future] = deque()
        self.profile = {} if os.environ.get("FLEXGEN_PROFILE") else None
        self.unfinished: deque = deque()
        # CPU attention on a worker thread overlaps the main thread's work on the next GPU batch
        self.cpu_pool = (ThreadPoolExecutor(1, thread_name_prefix="cpu-attention")
                         if self.policy.cpu_cache_compute and overlap and self.K > 1
                         and os.environ.get("FLEXGEN_CPU_ATTN_WORKER", "1") != "0" else None)
        # its results back to the GPU asynchronously, from pinned buffers (model/host_stage.py;
        # FLEXGEN_HOST_STAGE=0: synchronous copies both ways)
        self.host_stage = (HostStage(pin=self.env.has_cuda) if self.cpu_pool is not None
                           and os.environ.get("FLEXGEN_HOST_STAGE", "1") != "0" else None)
        self.whole_weight_copies = whole_weight_copies(self.policy)

    # ---- the steps -------------------------------------------------------------------------
    def load_weight(self, j: int) -> None:
        if j in self.weights or j >= len(self.layers):
            return
        home, gpu, pin = self.lm.weight_home[j], self.env.gpu.dev, self.policy.pin_weight
        whole = self.whole_weight_copies
        on_disk = [key for key, stored in home.items() if stored.tier == Tier.DISK]
        if not self.policy.overlap or not on_disk or len(on_disk) == len(home):
            # a layer held in host memory needs nothing of the host once its copies are queued:
            # its copies queue behind the previous layer's (Channel, pipelined)
            self.weights[j] = self.ch["weight"].submit(
                lambda: {key: stored.load(gpu, pin, whole) for key, stored in home.items()},
                pipelined=not on_disk)
            return
        # a layer split over disk and host memory: its disk reads run on their own channel while
        # its host part crosses the link (one after the other, the slower tier waited on both)
        from_disk = self.ch["weight_disk"].submit(
            lambda: {key: home[key].load(gpu, pin, whole) for key in on_disk})

        def load() -> dict:
            out = {key: stored.load(gpu, pin, whole) for key, stored in home.items()
                   if key not in on_disk}
            out.update(from_disk.result())
            return {key: out[key] for key in home}
        self.weights[j] = self.ch["weight"].submit(load)

    def load_cache(self, i: int, j: int, k: int) -> None:
        if i == 0 or i >= self.gen_len or j >= len(self.layers) or not self.layers[j].has_cache:
            return
        if (j, k) in self.cache_loads:
            return
        pending = self.cache_stores.get((j, k))
        length = self.prompt_len + i - 1
        self.cache_loads[(j, k)] = self.ch["cache_load"].submit(
            self._read_cache, self.cache_home[(j, k)], length, pending)

    def _read_cache(self, home, length: int, pending: Future | None) -> list[CachePart]:
        if pending is not None:
            pending.result()
        k_home, v_home = home
        parts = []
        for ks, vs in zip(k_home.segments, v_home.segments):
            on_cpu = self.policy.cpu_cache_compute and ks.tier != Tier.GPU
            dev = self.env.cpu.dev if on_cpu else self.env.gpu.dev
            if ks.tier == Tier.CPU:
                # the whole (zero-initialized) home buffer, positions from `length` on masked:
                # CPU batched matmuls are fast only on densely strided batches, and a contiguous
                # pinned buffer crosses to the GPU at full link speed (its first `length`
                # positions are strided: torch would stage them through pageable memory)
                parts.append(CachePart(ks.start, ks.stop, dev, ks.store.read_whole(dev),
                                       vs.store.read_whole(dev), valid=length))
            else:
                parts.append(CachePart(ks.start, ks.stop, dev, ks.read(length, dev),
                                       vs.read(length, dev), valid=length))
        return parts

    def store_cache(self, i: int, j: int, k: int, kv) -> None:
        if (j, k) not in self.cache_home:
            c = self.config
            shape = (self.B, c.n_kv_head, self.prompt_len + self.gen_len, c.head_dim)
            comp = None
            if self.policy.compress_cache:  # groups along head_dim, the original's group_dim 2
                comp = dataclasses.replace(self.policy.comp_cache_config, group_dim=3)
            self.cache_home[(j, k)] = tuple(
                self.env.mixed.alloc(shape, self.lm.dtype, self.policy.cache_percents(), True,
                                     comp, seq_dim=2, zero=True)
                for _ in range(2))
        pos = 0 if i == 0 else self.prompt_len + i - 1
        home = self.cache_home[(j, k)]
        fut = self.ch["cache_store"].submit(
            lambda: (home[0].write(pos, kv[0]), home[1].write(pos, kv[1])))
        self.cache_stores[(j, k)] = fut
        # a pending store holds its (GPU) keys and values: bound how many may wait, so compute
        # running ahead of a slower store link cannot pile them up (prefill: 2 x b x s x h each)
        self.pending_stores.append(fut)
        while len(self.pending_stores) > MAX_PENDING_STORES:
            self.pending_stores.popleft().result()

    def load_hidden(self, i: int, j: int, k: int):
        rows = slice(k * self.B, (k + 1) * self.B)
        if j == 0:
            cols = slice(0, self.prompt_len) if i == 0 else slice(self.prompt_len + i - 1, self.prompt_len + i)
            return torch.from_numpy(self.output_ids[rows, cols]).to(self.env.gpu.dev)
        h = self.hidden.pop(k)
        if isinstance(h, torch.Tensor):
            return h
        x = h.read_all(h.shape[1], self.env.gpu.dev)
        self.env.mixed.free(h)
        return x

    def record_ids(self, i: int, k: int, ids: np.ndarray) -> None:
        """The ids GPU batch k picked at token i, into output_ids."""
        self.output_ids[k * self.B:(k + 1) * self.B, self.prompt_len + i] = ids

    def store_hidden(self, i: int, j: int, k: int, out) -> None:
        if j == len(self.layers) - 1:
            if self.want_logits:
                self.logits[k * self.B:(k + 1) * self.B] = out.float().cpu().numpy()
            else:
                self.record_ids(i, k, out.cpu().numpy())
            return
        pct = self.policy.act_percents()
        if pct[0] == 100:
            self.hidden[k] = out
            return
        home = self.env.mixed.alloc(tuple(out.shape), out.dtype, pct, pin=True, long_lived=False)
        home.write(0, out)
        self.hidden[k] = home

    def step_info(self, i: int, k: int) -> StepInfo:
        """Mask and positions of GPU batch k at token i (made once, at the first layer)."""
        if (i, k) not in self.steps:
            rows = slice(k * self.B, (k + 1) * self.B)
            ids = self.output_ids[rows, :self.prompt_len]
            mask = np.concatenate([ids != self.pad, np.ones((self.B, i), bool)], axis=1)
            pos = np.cumsum(mask, axis=1) * mask - 1
            pos = pos if i == 0 else pos[:, -1:]
            dev = self.env.gpu.dev
            self.steps.pop((i - 1, k), None)
            host_mask = torch.from_numpy(mask)
            self.steps[(i, k)] = StepInfo(i, self.prompt_len, host_mask.to(dev),
                                          torch.from_numpy(pos).to(dev), self.policy.attn_sparsity,
                                          self.pick, self.want_logits, self.cpu_pool, host_mask,
                                          self.host_stage)
        return self.steps[(i, k)]

    def compute(self, i: int, j: int, k: int) -> None:
        layer = self.layers[j]
        t0 = time.perf_counter()
        with trace.span("wait"):
            w = self.weights[j].result()
            cache = self.cache_loads.pop((j, k)).result() if layer.has_cache and i > 0 else None
        t1 = time.perf_counter()
        with trace.span(type(layer).__name__):
            x = self.load_hidden(i, j, k)
            out = layer.forward(x, w, self.step_info(i, k), cache)
        # a Deferred result (CPU attention on the worker) is finished after the next GPU batch
        # has started, so the CPU attends while this thread prepares that batch
        self.unfinished.append((i, j, k, out, w, cache, t1 - t0))
        keep = 1 if isinstance(out, Deferred) and k < self.K - 1 else 0
        while len(self.unfinished) > keep:
            self._finish(*self.unfinished.popleft())
        if k == self.K - 1:
            del self.weights[j]

    def _finish(self, i: int, j: int, k: int, out, w, cache, waited: float) -> None:
        layer = self.layers[j]
        t1 = time.perf_counter()
        if isinstance(out, Deferred):
            with trace.span(f"{type(layer).__name__}/finish"):
                out = out.result()
        if self.profile is not None:  # FLEXGEN_PROFILE=1: where the time of each phase goes
            if self.env.has_cuda:
                torch.cuda.synchronize()
            key = ("prefill" if i == 0 else "decode", type(layer).__name__)
            wait, busy = self.profile.setdefault(key, [0.0, 0.0])
            self.profile[key] = [wait + waited, busy + time.perf_counter() - t1]
        if layer.has_cache:
            out, kv = out
            self.store_cache(i, j, k, kv)
        self.store_hidden(i, j, k, out)
        if self.env.has_cuda and self.policy.overlap:
            _mark_used_on_current_stream(w, cache)

    # ---- orderings -------------------------------------------------------------------------
    def run(self) -> np.ndarray:
        with self.env.computing():
            out = self._run()
        if self.env.has_cuda:  # results leave the compute stream for the caller's
            torch.cuda.current_stream().wait_stream(self.env.compute_stream)
        return out

    def _run(self) -> np.ndarray:
        n_layers = len(self.layers)
        graphs = self._graphs()
        for i in range(self.gen_len):
            if graphs is not None and i > 0 and graph_decode.PIPELINE:
                self._pipelined_decode(graphs, i)
                break
            t0 = time.perf_counter()
            trace.set_phase("prefill" if i == 0 else "decode")
            if graphs is not None and i > 0:
                for fut in self.cache_stores.values():
                    fut.result()
                for k in range(self.K):
                    graphs.step(i, k)
            else:
                for j in range(n_layers):
                    for k in range(self.K):
                        if self.policy.overlap:
                            self._overlap_step(i, j, k)
                        else:
                            self._normal_step(i, j, k)
            self._finish_token(i)
            self.step_times.append(time.perf_counter() - t0)
            if self.profile is not None:
                print(f"[profile] token {i}: {self.step_times[-1]:.3f} s; " + "; ".join(
                    f"{a}/{b} wait {w:.3f} compute {c:.3f}" for (a, b), (w, c) in self.profile.items()),
                    file=sys.stderr, flush=True)
                self.profile.clear()
            if self.want_logits or (self.stop is not None and self.stopped.all()) \
                    or i + 1 >= self.max_steps:
                break
        self._drain()
        return self.output_ids

    def _pipelined_decode(self, graphs: GraphedDecode, start: int) -> None:
        """Tokens start.. through the CUDA graphs, each queued before the previous one's ids are
        collected, so the GPU never waits for the host between tokens. Stopping and max_steps
        are checked one token late; a token queued past the end is never collected (its column
        stays padding, as it would had it not run)."""
        for fut in self.cache_stores.values():
            fut.result()
        trace.set_phase("decode")
        end = min(self.gen_len, self.max_steps)
        t0 = time.perf_counter()
        prev = None
        for i in range(start, end + 1):
            if i < end:
                for k in range(self.K):
                    graphs.queue(i, k)
            if prev is not None:
                graphs.collect(prev)
                self._finish_token(prev)
                now = time.perf_counter()
                self.step_times.append(now - t0)
                t0 = now
                if self.stop is not None and self.stopped.all():
                    break
            prev = i
        graphs.in_flight.clear()

    def close(self) -> None:
        """Stop the CPU attention worker (after a failure too)."""
        if self.cpu_pool is not None:
            self.cpu_pool.shutdown(wait=True, cancel_futures=True)

    def _graphs(self) -> GraphedDecode | None:
        """Cache homes persist across blocks and calls of the same shape (no re-allocation, no
        re-pinning, and captured CUDA graphs stay valid); graph decode where everything is on
        the GPU."""
        key = (self.prompt_len, self.gen_len)
        state = self.lm.block_state
        if state.get("key") != key:
            self.lm.release_cache()
            state.update(key=key, homes={}, graphs=None)
        self.cache_home = state["homes"]
        if not (self.lm.use_cuda_graphs and graphable(self.policy, self.env, self.want_logits)):
            return None
        if state["graphs"] is None:
            state["graphs"] = GraphedDecode(self)
        state["graphs"].start_block(self)
        return state["graphs"]

    def _normal_step(self, i: int, j: int, k: int) -> None:
        self.load_weight(j)
        self.load_cache(i, j, k)
        self.compute(i, j, k)

    def _overlap_step(self, i: int, j: int, k: int) -> None:
        n_layers = len(self.layers)
        self.load_weight(j)                         # only the very first step waits for this
        self.load_cache(i, j, k)
        if k == 0:  # the next layers' weights (shared by all batches), wrapping to the next token
            for ahead in range(j + 1, j + 1 + PREFETCH_LAYERS):
                if ahead < n_layers:
                    self.load_weight(ahead)
                elif i + 1 < self.gen_len:
                    self.load_weight(ahead - n_layers)
        ni, nj, nk = (i, j, k + 1) if k + 1 < self.K else (i, j + 1, 0)
        if nj == n_layers:
            ni, nj = i + 1, 0
        if ni == i:                                 # next step's cache (same token only)
            self.load_cache(ni, nj, nk)
        self.compute(i, j, k)

    def _finish_token(self, i: int) -> None:
        if self.stop is None or self.want_logits:
            return
        col = self.prompt_len + i
        self.output_ids[self.stopped, col] = self.pad
        self.stopped |= self.output_ids[:, col] == self.stop

    def _drain(self) -> None:
        """Wait for every copy still in flight (raising the first failure), drop the buffers."""
        futures = list(self.weights.values()) + list(self.cache_loads.values()) + \
            list(self.cache_stores.values())
        self.weights.clear()
        self.cache_loads.clear()
        for fut in futures:
            fut.result()
        self.cache_stores.clear()
        self.unfinished.clear()
        self.close()
        self.hidden.clear()


def _mark_used_on_current_stream(w: dict, cache) -> None:
    """Tensors loaded on a copy stream are used on the compute stream: tell the caching allocator,
    so their memory is not handed to the next load before the compute that reads them is done."""
    current = torch.cuda.current_stream()
    tensors = list(w.values())
    for part in cache or ():
        tensors += [part.k, part.v]
    for t in tensors:
        for piece in (t.components().values() if hasattr(t, "components") else [t]):
            if piece.is_cuda:
                piece.record_stream(current)
