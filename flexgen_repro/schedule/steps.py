"""The steps of the block driver, on the state of one block: load_weight, load_cache, compute
(which loads and stores the hidden state), store_cache.

Dependencies are futures: compute waits for exactly the loads it needs, a cache load waits for the
store of the same (layer, batch), and a failed copy re-raises in the driver. Each step may be
called again for work already queued (it then does nothing), so a strategy can ask for a load
ahead of time and again when it is needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from flexgen_repro import trace
from flexgen_repro.model.base import CachePart, Deferred, StepInfo
from flexgen_repro.kernels import cpu_attention
from flexgen_repro.model.layers import dense
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.devices.copy_engine import wait_done
from flexgen_repro.devices.host_stage import HostStage
from flexgen_repro.devices.storage import write_to_host
from flexgen_repro.policy import Tier, dequantize_once, whole_copies

# Cache stores in flight, in prefill stores' worth of bytes: each pending store holds its (GPU)
# keys and values, so compute running ahead of a slower store link cannot pile them up (prefill:
# 2 x b x s x h each). A decode store holds one token's, so hundreds fit the same bytes and the
# host is never held to a few GPU batches ahead of the compute by them.
MAX_PENDING_STORES = 2
# Layers the host may queue ahead of the GPU's compute (BlockSteps._bound_lead): enough to keep
# the GPU fed, few enough that loads queued ahead hold about as much memory as one layer's overlap.
RUN_AHEAD_LAYERS = 2


def decode_threads(options: RuntimeOptions, policy, env) -> tuple[RuntimeOptions, int | None]:
    """(the options decode runs with, torch's intra-op thread count during decode or None for
    unchanged). Where the C kernel attends on the host beside a GPU, decode's other host work is
    small copies and masks; torch's team for them (every core by default) is a second OpenMP team
    beside the kernel's, whose threads spin after each copy on the cores the kernel works on.
    Decode then runs torch on RESERVED_CORES threads, with the kernel's team size fixed first (its
    default follows torch's count). OPT-1.3B, cache on disk, 16x1, H100 machine of 16 cores, two
    runs each in one call: 82.4 and 84.3 ms per decode step against 91.3-99.1 with 16 torch
    threads (docs/performance-targets.md). Prefill keeps every thread: its cache stores are
    large. So do runs whose weights cross through host copies, which torch spreads over its
    threads (weights read from disk, unpinned ones staged): only pinned or GPU-resident weights
    qualify."""
    weights_by_dma = policy.w_disk_percent == 0 and (policy.pin_weight or policy.w_cpu_percent == 0)
    if not (env.has_cuda and policy.cpu_cache_compute and weights_by_dma
            and options.cpu_attention_kernel and cpu_attention.library() is not None):
        return options, None
    threads = min(torch.get_num_threads(), cpu_attention.RESERVED_CORES)
    return dataclasses.replace(options, cpu_attention_threads=cpu_attention.n_threads(
        options.cpu_attention_threads)), threads


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to `n` inside (None: unchanged), restored after."""
    if n is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class BlockSteps:
    """Generates `gen_len` tokens for one block of gpu_batch_size x num_gpu_batches prompts: the
    block's state and the steps the strategies order."""

    def __init__(self, lm, input_ids: np.ndarray, gen_len: int, pick, stop,
                 want_logits: bool = False, max_steps: int | None = None,
                 prompt_mask: np.ndarray | None = None, live: np.ndarray | None = None,
                 stop_check=None, cache_len: int | None = None):
        """`stop`: an id or a set of ids that end a row; `prompt_mask` (rows, prompt_len): real
        prompt tokens (default: not the pad id); `live` (rows,): False for filler rows, which
        count as ended from the start; `stop_check(rows, generated) -> ended` ends rows too;
        `cache_len`: positions of each cache home (default and least: prompt_len + gen_len; more
        lets blocks of other lengths reuse the homes, and graphs captured on them)."""
        self.lm, self.env, self.policy, self.config = lm, lm.env, lm.policy, lm.config
        self.layers, self.gen_len, self.pick, self.stop = lm.layers, gen_len, pick, stop
        self.want_logits = want_logits
        self.max_steps = gen_len if max_steps is None else max(1, min(max_steps, gen_len))
        self.B, self.K = self.policy.gpu_batch_size, self.policy.num_gpu_batches
        self.prompt_len = input_ids.shape[1]
        self.cache_len = max(cache_len or 0, self.prompt_len + gen_len)
        self.pad = self.config.pad_token_id
        self.output_ids = np.full((self.B * self.K, self.prompt_len + gen_len), self.pad, np.int64)
        self.output_ids[:, :self.prompt_len] = input_ids
        self.prompt_mask = input_ids != self.pad if prompt_mask is None else prompt_mask
        if isinstance(stop, (int, np.integer)):
            stop = {int(stop)}
        self.stop = None if stop is None else np.array(sorted(stop), np.int64)
        self.stop_check = stop_check
        overlap = self.policy.overlap
        self.ch = {name: self.env.channel(name, overlap) for name in self.env.CHANNELS}
        held = self.policy.cache_gpu_percent >= 100 and not self.policy.cpu_cache_compute
        if held:
            # a cache held on the GPU moves nowhere: its prefill stores are one copy kernel each,
            # queued in order on the compute stream; through a copy thread they would make
            # compute wait for the GPU to drain at every (layer, batch) step
            for name in ("cache_load", "cache_store"):
                self.ch[name] = self.env.channel(name, False)
        # ... and decode attends over its home buffer itself, the new token written in place
        # (the resident path the CUDA graphs replay: one fused attention call, no concatenation
        # and no separate store), with a full-length mask made once per step
        self.resident = (held and not self.policy.compress_cache
                         and self.policy.attn_sparsity == 1.0)
        self.weights: dict[int, Future] = {}
        self.cache_loads: dict[tuple[int, int], Future] = {}
        self.cache_stores: dict[tuple[int, int], Future] = {}
        self.cache_home: dict[tuple[int, int], tuple] = {}
        self.hidden: dict[int, object] = {}
        self.steps: dict[int, StepInfo] = {}
        self.stopped = np.zeros(self.B * self.K, dtype=bool) if live is None else ~live
        self.live_batches = self._unfinished_batches()
        self.logits = np.zeros((self.B * self.K, self.prompt_len, self.config.vocab_size),
                               np.float32) if want_logits else None
        self.step_times: list[float] = []
        self.pending_stores: deque[tuple[Future, int]] = deque()
        self.pending_store_bytes = 0
        # MAX_PENDING_STORES prefill stores: K and V of B rows x prompt_len positions each
        self.store_budget = MAX_PENDING_STORES * 2 * self.B * self.prompt_len * \
            self.config.n_kv_head * self.config.head_dim * lm.dtype.itemsize
        self.profile = {} if lm.options.profile else None
        self.unfinished: deque = deque()
        self.layer_ends: deque = deque()   # events after each layer's last batch (_bound_lead)
        # CPU attention on a worker thread overlaps the main thread's work on the next GPU batch;
        # its results go back to the GPU asynchronously, from pinned buffers (devices/host_stage.py)
        self.cpu_pool = (ThreadPoolExecutor(1, thread_name_prefix="cpu-attention")
                         if self.policy.cpu_cache_compute and overlap and self.K > 1 else None)
        self.host_stage = (HostStage(pin=self.env.has_cuda, gate=self.env.engine.gate)
                           if self.cpu_pool is not None else None)
        self.whole_copies = whole_copies(self.policy)   # weights and cache loads
        self.options, self.decode_torch_threads = decode_threads(lm.options, self.policy, self.env)
        # layer j's weights dequantized once per token, shared by its GPU batches (policy.py)
        self.dense: dict[int, dict] | None = {} if dequantize_once(self.policy) else None
        self.prefetch_layers = lm.prefetch_layers
        self.graphed_decode = False    # decode through captured graphs (set by the driver)

    # ---- load_weight ---------------------------------------------------------------------------
    def load_weight(self, j: int) -> None:
        """Queue layer j's weights to the GPU (once per layer and token, shared by every batch)."""
        if j in self.weights or j >= len(self.layers):
            return
        home, gpu, pin = self.lm.weight_home[j], self.env.gpu.dev, self.policy.pin_weight
        whole = self.whole_copies
        on_disk = [key for key, stored in home.items() if stored.tier == Tier.DISK]
        if not self.policy.overlap or not on_disk or len(on_disk) == len(home):
            # once a layer's copies are queued the thread goes on to the next layer (Channel,
            # pipelined): a layer on disk is read into pinned buffers while the previous one
            # crosses (torch's pinned-block cache keeps each buffer until its copy is done)
            self.weights[j] = self.ch["weight"].submit(
                lambda: {key: stored.load(gpu, pin, whole) for key, stored in home.items()},
                pipelined=True)
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
        self.weights[j] = self.ch["weight"].submit(load, pipelined=True)

    # ---- load_cache / store_cache --------------------------------------------------------------
    def load_cache(self, i: int, j: int, k: int) -> None:
        """Queue the cache of (layer j, batch k) for token i, after that pair's last store."""
        if i == 0 or i >= self.gen_len or j >= len(self.layers) or not self.layers[j].has_cache:
            return
        if self.resident:      # nothing to load: compute attends over the home (_resident_part)
            return
        if (j, k) in self.cache_loads or k not in self.live_batches:
            return
        pending = self.cache_stores.get((j, k))
        length = self.prompt_len + i - 1
        # a home read only what stores wrote (the job waits for the last one itself), into new
        # buffers: nothing on the compute stream needs to finish first, so the copy starts while
        # the layers before it still compute
        self.cache_loads[(j, k)] = self.ch["cache_load"].submit(
            self._read_cache, self.cache_home[(j, k)], length, pending, after_compute=False,
            pipelined=True)

    def _read_cache(self, home, length: int, pending: Future | None) -> list[CachePart]:
        if pending is not None:
            pending.result()
        k_home, v_home = home
        parts = []
        for ks, vs in zip(k_home.segments, v_home.segments):
            on_cpu = self.policy.cpu_cache_compute and ks.tier != Tier.GPU
            dev = self.env.cpu.dev if on_cpu else self.env.gpu.dev
            if ks.tier == Tier.CPU or (on_cpu and ks.store.whole_on_cpu) or (ks.tier == Tier.GPU and ks.in_memory):
                # the whole (zero-initialized) home buffer, positions from `length` on masked:
                # CPU batched matmuls are fast only on densely strided batches, and a contiguous
                # pinned buffer crosses to the GPU at full link speed (its first `length`
                # positions are strided: torch would stage them through pageable memory); for
                # CPU attention, a mapped disk file's mapping itself (read in place, no copy).
                # Attended on the compute device, a plain buffer takes the new token at `length`
                # (a copy, or the GPU home itself, where the store writes the same bytes) and
                # one fused attention call covers it (layers.SelfAttention._decode)
                parts.append(CachePart(ks.start, ks.stop, dev,
                                       ks.store.read_whole(dev, self.whole_copies),
                                       vs.store.read_whole(dev, self.whole_copies), valid=length,
                                       in_place=ks.in_memory and not on_cpu))
            else:
                parts.append(CachePart(ks.start, ks.stop, dev, ks.read(length, dev),
                                       vs.read(length, dev), valid=length))
        return parts

    def _resident_part(self, j: int, k: int, step: StepInfo) -> list[CachePart]:
        """The cache of (layer j, batch k) as its GPU home buffers, attended and written in place
        at `step.write_index` (the home holds cache_len positions; step.mask covers them)."""
        k_home, v_home = self.cache_home[(j, k)]
        return [CachePart(0, self.B, self.env.gpu.dev, k_home.buffer(), v_home.buffer(),
                          resident=True, write_index=step.write_index)]

    def store_cache(self, i: int, j: int, k: int, kv) -> None:
        """Queue token i's new keys and values of (layer j, batch k) to their home."""
        if (j, k) not in self.cache_home:
            self.cache_home[(j, k)] = self.new_cache_home(j, k)
        pos = 0 if i == 0 else self.prompt_len + i - 1
        home = self.cache_home[(j, k)]
        # keys and values already in host memory (copied there for CPU attention) are complete:
        # their store waits for no compute
        fut = self.ch["cache_store"].submit(self._write_cache, home, pos, kv, i > 0,
                                            after_compute=any(t.is_cuda for t in kv))
        self.cache_stores[(j, k)] = fut
        size = kv[0].numel() * kv[0].element_size() * 2
        self.pending_stores.append((fut, size))
        self.pending_store_bytes += size
        while self.pending_store_bytes > self.store_budget:
            done, size = self.pending_stores.popleft()
            done.result()
            self.pending_store_bytes -= size

    @staticmethod
    def _write_cache(home, pos: int, kv, small: bool) -> None:
        """K and V into their homes; a decode step's (one position, `small`) writes into host
        memory go as one copy and one wait (storage.write_to_host). Prefill's large ones go
        each on its own: gathering them would hold a second copy of them on the GPU."""
        host_writes: list | None = [] if small else None
        home[0].write(pos, kv[0], host_writes)
        home[1].write(pos, kv[1], host_writes)
        if host_writes:
            write_to_host(host_writes)

    def new_cache_home(self, j: int, k: int, length: int | None = None) -> tuple:
        """(keys, values) homes of (layer j, batch k): `length` positions (default cache_len),
        split over the tiers by the policy, zero-filled (unwritten positions are finite)."""
        c = self.config
        shape = (self.B, c.n_kv_head, length or self.cache_len, c.head_dim)
        comp = None
        if self.policy.compress_cache:  # groups along head_dim, the original's group_dim 2
            comp = dataclasses.replace(self.policy.comp_cache_config, group_dim=3)
        return tuple(self.env.mixed.alloc(shape, self.lm.dtype, self.policy.cache_percents(), True,
                                          comp, seq_dim=2, zero=True)
                     for _ in range(2))

    def wait_cache_stores(self) -> None:
        """Every queued cache store done (before the cache is read in place)."""
        for fut in self.cache_stores.values():
            fut.result()

    # ---- hidden states and ids -----------------------------------------------------------------
    def load_hidden(self, i: int, j: int, k: int):
        """Layer j's input for batch k at token i: the ids at the first layer, else the last output."""
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
        """Layer j's output for batch k: the picked ids (or logits) after the last layer."""
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
            mask, pos = self.mask_and_positions(i, k)
            dev = self.env.gpu.dev
            self.steps.pop((i - 1, k), None)
            index = None
            if self.resident and i > 0:  # the home's every position; the new token's column
                full = np.zeros((mask.shape[0], self.cache_len), dtype=bool)
                full[:, :mask.shape[1]] = mask
                mask = full
                index = torch.full((1,), self.prompt_len + i - 1, dtype=torch.long, device=dev)
            host_mask = torch.from_numpy(mask)
            self.steps[(i, k)] = StepInfo(i, self.prompt_len, host_mask.to(dev),
                                          torch.from_numpy(pos).to(dev), self.policy.attn_sparsity,
                                          self.pick, self.want_logits, self.cpu_pool, host_mask,
                                          self.host_stage, self.options, index)
        return self.steps[(i, k)]

    def mask_and_positions(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(b, prompt_len + i) bool mask of real positions; position ids of token i's inputs."""
        rows = slice(k * self.B, (k + 1) * self.B)
        mask = np.concatenate([self.prompt_mask[rows], np.ones((self.B, i), bool)], axis=1)
        pos = np.cumsum(mask, axis=1) * mask - 1
        return mask, (pos if i == 0 else pos[:, -1:])

    # ---- compute -------------------------------------------------------------------------------
    def compute(self, i: int, j: int, k: int) -> None:
        """Layer j on batch k at token i, once its loads are done; its result is finished (cache
        and hidden state stored) now, or after the next batch started where CPU attention runs
        on the worker."""
        layer = self.layers[j]
        t0 = time.perf_counter()
        step = self.step_info(i, k)
        with trace.span("wait"):
            w = self.weights[j].result()
            cache = None
            if layer.has_cache and i > 0:
                cache = self._resident_part(j, k, step) if self.resident else \
                    self.cache_loads.pop((j, k)).result()
        t1 = time.perf_counter()
        with trace.span(type(layer).__name__):
            x = self.load_hidden(i, j, k)
            out = layer.forward(x, self._dense_weights(j, w), step, cache)
        self.unfinished.append((i, j, k, out, w, cache, t1 - t0))
        last = self.live_batches[-1]
        keep = 1 if isinstance(out, Deferred) and k < last else 0
        while len(self.unfinished) > keep:
            self._finish(*self.unfinished.popleft())
        if k == last:
            del self.weights[j]
            if self.dense is not None:
                self.dense.pop(j, None)
            self._bound_lead()

    def _dense_weights(self, j: int, w: dict) -> dict:
        """Layer j's weights as its batches compute with them: with dequantize_once, the
        compressed ones dequantized at the layer's first batch (on the compute stream) and kept
        until its last; else as loaded. The loaded ones stay what _finish marks as used."""
        if self.dense is None:
            return w
        if j not in self.dense:
            with trace.span("dequantize"):
                self.dense[j] = {key: dense(v) for key, v in w.items()}
        return self.dense[j]

    def _bound_lead(self) -> None:
        """After a layer's last batch is queued, wait until the GPU has finished the layer
        RUN_AHEAD_LAYERS before it: loads are taken as stream waits (Channel, pipelined), so nothing
        else holds the host back from queueing a token's layers, and the loads they hold, far ahead
        of the compute that frees them."""
        if not (self.env.has_cuda and self.policy.overlap):
            return
        end = torch.cuda.Event()
        end.record()
        self.layer_ends.append(end)
        if len(self.layer_ends) > RUN_AHEAD_LAYERS:
            wait_done(self.layer_ends.popleft())

    def _finish(self, i: int, j: int, k: int, out, w, cache, waited: float) -> None:
        layer = self.layers[j]
        t1 = time.perf_counter()
        if isinstance(out, Deferred):
            with trace.span(f"{type(layer).__name__}/finish"):
                out = out.result()
        if self.profile is not None:
            self._profile_layer(i, layer, waited, t1)
        if layer.has_cache:
            out, kv = out
            if not (self.resident and i > 0):    # resident: written in place already
                self.store_cache(i, j, k, kv)
        self.store_hidden(i, j, k, out)
        if self.env.has_cuda and self.policy.overlap:
            # a layer's weights serve every GPU batch: marked once (the mark holds until they
            # are freed, after the last batch's compute); each batch's loaded cache is its own
            first = k == self.live_batches[0]
            _mark_used_on_current_stream(w if first else {}, None if self.resident else cache)

    # ---- tokens --------------------------------------------------------------------------------
    def start_token(self, i: int) -> float:
        trace.set_phase("prefill" if i == 0 else "decode")
        return time.perf_counter()

    def end_token(self, i: int, t0: float) -> bool:
        """Token i done: apply `stop`, record its time; True where generation ends here."""
        self.finish_token(i)
        self.step_times.append(time.perf_counter() - t0)
        if self.profile is not None:
            print(f"[profile] token {i}: {self.step_times[-1]:.3f} s; " + "; ".join(
                f"{a}/{b} wait {w:.3f} compute {c:.3f}" for (a, b), (w, c) in self.profile.items()),
                file=sys.stderr, flush=True)
            self.profile.clear()
        return self.want_logits or self.all_stopped() or i + 1 >= self.max_steps

    def finish_token(self, i: int) -> None:
        """Rows that ended before token i hold the pad id from there on; rows end at a stop id
        or by stop_check; GPU batches whose rows have all ended leave the decode steps."""
        if self.want_logits:
            return
        col = self.prompt_len + i
        self.output_ids[self.stopped, col] = self.pad
        if self.stop is not None:
            self.stopped |= np.isin(self.output_ids[:, col], self.stop)
        rows = np.flatnonzero(~self.stopped)
        if self.stop_check is not None and rows.size:
            ended = self.stop_check(rows, self.output_ids[rows, self.prompt_len:col + 1])
            self.stopped[rows] |= np.asarray(ended, bool)
        if not self.stopped.all():
            self.live_batches = self._unfinished_batches()

    def _unfinished_batches(self) -> list[int]:
        """GPU batches with a row still generating (all of them when every row has ended)."""
        done = self.stopped.reshape(self.K, self.B).all(axis=1)
        return [k for k in range(self.K) if not done[k]] or list(range(self.K))

    def all_stopped(self) -> bool:
        return bool(self.stopped.all())

    def _profile_layer(self, i: int, layer, waited: float, t1: float) -> None:
        """RuntimeOptions.profile: where the time of each phase goes (synchronizes the GPU)."""
        if self.env.has_cuda:
            torch.cuda.synchronize()
        key = ("prefill" if i == 0 else "decode", type(layer).__name__)
        wait, busy = self.profile.setdefault(key, [0.0, 0.0])
        self.profile[key] = [wait + waited, busy + time.perf_counter() - t1]

    def drain(self) -> None:
        """Wait for every copy still in flight (raising the first failure), drop the buffers."""
        futures = list(self.weights.values()) + list(self.cache_loads.values()) + \
            list(self.cache_stores.values())
        self.weights.clear()
        self.cache_loads.clear()
        if self.dense is not None:
            self.dense.clear()
        for fut in futures:
            fut.result()
        self.cache_stores.clear()
        self.unfinished.clear()
        self.close()
        self.hidden.clear()

    def close(self) -> None:
        """Stop the CPU attention worker (after a failure too)."""
        if self.cpu_pool is not None:
            self.cpu_pool.shutdown(wait=True, cancel_futures=True)


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
