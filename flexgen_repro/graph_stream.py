"""Decode with every weight streamed from pinned host memory: one CUDA graph per (layer, GPU batch).

Where the cache and the activations stay on the GPU and only the weights cross each token, decode
of small GPU batches is bound by the host queueing kernels, not by the link (OPT-1.3B at 4x4:
about 1.6 ms of host work per layer against 1.0 ms of copies; docs/performance-targets.md).
Here a layer's weights are copied into fixed GPU buffers (`WeightSlots`: two per kind of layer,
taken in turn) on a copy stream that first waits for the compute that last read the slot, and
each (layer, batch) step is a graph captured at its first decode token over its slot and its
cache home. The host queues a layer as its copies and one replay per batch, and waits for the GPU
only for each token's ids, collected one token late as in GraphedDecode.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import torch

from flexgen_repro.devices.storage import carve, packed_layout
from flexgen_repro.graph_decode import GraphedDecode, graphable
from flexgen_repro.policy import Policy, Tier, dequantize_once

# Slots per kind of layer: a layer's copy into one runs while the previous layer of its kind
# computes from the other. More would only let the copies run further ahead of a link they fill.
SLOTS_PER_KIND = 2
# Each tensor in a slot starts at a multiple of this many bytes (as the caching allocator's
# blocks do), so kernels see the alignment they would on a freshly allocated tensor.
SLOT_ALIGN = 512


def stream_switches(policy: Policy) -> bool:
    """The switches streamed-weight graphs need, whatever the percentages: overlap, pinned
    weights, dense attention over an uncompressed cache that the GPU attends, and each batch
    reading its layer's weights as loaded (not dequantized once for all of them)."""
    return (policy.overlap and policy.pin_weight and policy.attn_sparsity == 1.0
            and not policy.compress_cache and not policy.cpu_cache_compute
            and not dequantize_once(policy))


def streamable(policy: Policy, env, want_logits: bool) -> bool:
    """Only the weights move during decode: all of them, from pinned host memory. (A share kept on
    the GPU would leave slots sized by the largest host share of each kind of layer, which whole
    tensors make much more than the average: memory the cost model could not count.)"""
    return (env.has_cuda and not want_logits and stream_switches(policy)
            and policy.w_cpu_percent == 100
            and policy.cache_gpu_percent == 100 and policy.act_gpu_percent == 100)


def graph_kind(policy: Policy, env, want_logits: bool) -> str | None:
    """How decode goes through CUDA graphs: "all-gpu" (everything on the GPU,
    graph_decode.graphable), "streamed-weights" (only the weights move, streamable), or None."""
    if graphable(policy, env, want_logits):
        return "all-gpu"
    return "streamed-weights" if streamable(policy, env, want_logits) else None


def _leaves(home: dict) -> list[tuple[tuple, object]]:
    """A layer's stored tensors as ((key,) or (key, component), Stored) pairs: a compressed
    weight's packed components are tensors of their own."""
    out = []
    for key, stored in home.items():
        if stored.parts:
            out += [((key, name), part) for name, part in stored.parts.items()]
        else:
            out.append(((key,), stored))
    return out


def _slots(weight_home: list[dict], sizes: list[int]) -> tuple[list[tuple], Counter]:
    """(each layer's slot, each slot's bytes) for layers of `sizes` bytes: a layer's kind is its
    weight names; the kind's layers take its SLOTS_PER_KIND slots in turn."""
    kinds = [tuple(sorted(home)) for home in weight_home]
    count, seen = Counter(kinds), Counter()
    slot_of, slot_bytes = [], Counter()
    for kind, nbytes in zip(kinds, sizes):
        slot = (kind, seen[kind] % min(SLOTS_PER_KIND, count[kind]))
        seen[kind] += 1
        slot_of.append(slot)
        slot_bytes[slot] = max(slot_bytes[slot], nbytes)
    return slot_of, slot_bytes


class WeightSlots:
    """Fixed device buffers that the layers' weights, all in host memory, are copied into in turn.

    Layers of the same kind (the same weight names) share SLOTS_PER_KIND slots, each as large as
    the largest of its layers; layer j always reads the same views of the same slot, so a graph
    captured over them stays valid. Loads go in layer order (wrapping to the next
    token's first layers); a load waits on the device for the compute that last read its slot
    (`release`), and the compute of layer j for its load (`acquire`), so the host never waits.
    """

    def __init__(self, weight_home: list[dict], device: torch.device):
        """The plan: each layer's tensors laid out in its slot, and each slot's bytes
        (`allocate` makes the slots)."""
        self.home, self.device = weight_home, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host = [_leaves(h) for h in weight_home]
        self.layouts = [packed_layout([(path, leaf.data.shape, leaf.data.dtype)
                                       for path, leaf in leaves], SLOT_ALIGN)
                        for leaves in self.host]       # (layout, bytes) per layer
        self.slot_of, self.slot_bytes = _slots(weight_home, [n for _, n in self.layouts])
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._views: dict[int, dict] = {}
        self._weights: dict[int, dict] = {}
        self.free: dict[tuple, object] = {}    # slot -> event after the compute that read it last
        self.restart()

    def allocate(self) -> None:
        """Every slot on the device (torch.OutOfMemoryError where they do not fit)."""
        self.buffers = {slot: torch.empty(n, dtype=torch.uint8, device=self.device)
                        for slot, n in self.slot_bytes.items()}
        if self.cuda:   # freed (the model's cache released), not reused before the copies end
            for buf in self.buffers.values():
                buf.record_stream(self.stream)

    @classmethod
    def create(cls, weight_home: list[dict], device: torch.device) -> "WeightSlots | None":
        """Slots for these weights, allocated now (a GPU short of them fails here, before the
        block starts, not mid-decode); or None where one is not a tensor in host memory, pinned
        where the device is a GPU (a disk file, or unpinned memory a copy would stage on the
        host), or where the device cannot hold the slots (a warning says so; decode then runs
        without graphs, as the policy would without them)."""
        for home in weight_home:
            for _, leaf in _leaves(home):
                data = leaf.data
                if leaf.tier != Tier.CPU or not isinstance(data, torch.Tensor):
                    return None
                if device.type == "cuda" and not data.is_pinned():
                    return None
        slots = cls(weight_home, device)
        try:
            slots.allocate()
        except torch.OutOfMemoryError:
            need = sum(slots.slot_bytes.values())
            warnings.warn(f"the GPU cannot hold the {need / 2**30:.2f} GiB of weight slots that "
                          f"graph decode of streamed weights needs: decoding without CUDA graphs "
                          f"(a smaller --gpu-batch-size or fewer GPU batches leave room for them)")
            return None
        return slots

    def restart(self) -> None:
        """Forget loads queued ahead (a new block starts at layer 0; the slots keep their bytes)."""
        self.loaded: dict[int, object] = {}   # layer -> event after its copies (queued, unused)
        self.held: dict[tuple, int] = {}      # slot -> layer loaded into it and not yet released
        self.next = 0                         # the next layer to load

    def weights(self, j: int) -> dict:
        """Layer j's weights as its graphs read them: views of its slot."""
        if j not in self._weights:
            views = self._slot_views(j)
            w = {}
            for key, stored in self.home[j].items():
                if stored.parts:
                    from flexgen_repro.compression import CompressedTensor
                    comps = {name: views[(key, name)] for name in stored.parts}
                    w[key] = CompressedTensor.from_components(comps, stored.meta)
                else:
                    w[key] = views[(key,)]
            self._weights[j] = w
        return self._weights[j]

    def _slot_views(self, j: int) -> dict:
        """{path: view of layer j's slot} for each of its tensors."""
        if j not in self._views:
            self._views[j] = carve(self.buffers[self.slot_of[j]], self.layouts[j][0])
        return self._views[j]

    def acquire(self, j: int) -> None:
        """Layer j's weights in its slot before the compute queued next (loaded now if not
        queued ahead)."""
        if j not in self.loaded:
            assert self.next == j and self.slot_of[j] not in self.held, "loads go in layer order"
            self._load(j)
        done = self.loaded.pop(j)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def release(self, j: int) -> None:
        """Layer j's compute is queued: its slot may take the next layer of its kind after it;
        then queue the loads whose slots are free, in layer order."""
        slot = self.slot_of[j]
        if self.cuda:
            self.free[slot] = torch.cuda.Event()
            self.free[slot].record(torch.cuda.current_stream(self.device))
        if self.held.get(slot) == j:
            del self.held[slot]
        while self.slot_of[self.next] not in self.held and self.next not in self.loaded:
            self._load(self.next)

    def _load(self, j: int) -> None:
        slot, buffers = self.slot_of[j], self._slot_views(j)
        self.held[slot] = j
        self.next = (j + 1) % len(self.home)
        self.loaded[j] = None                 # the host's copies are done when they return
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            if slot in self.free:             # recorded only where CUDA is
                self.stream.wait_event(self.free[slot])
            for path, leaf in self.host[j]:
                buffers[path].copy_(leaf.data, non_blocking=self.cuda)
            if self.cuda:
                self.loaded[j] = torch.cuda.Event()
                self.loaded[j].record(self.stream)


class StreamedGraphs(GraphedDecode):
    """Captured decode steps over streamed weights: `queue_token(i, batches)` queues token i of
    those GPU batches layer by layer (the weight copies, then one graph replay per batch),
    `collect(i)` records its ids. Graphs are captured in (layer, batch) order at first use, into
    one memory pool: each graph's output is kept, and every graph that runs between a graph and
    the one that reads its output was captured after it, so it cannot have reused its memory."""

    def __init__(self, slots: WeightSlots):
        super().__init__(weights=[])
        self.slots = slots
        self.outs: dict[tuple[int, int], torch.Tensor] = {}   # (j, k) -> its graph's output
        self.capture_stream = torch.cuda.Stream(slots.device) if slots.cuda else None

    def start_block(self, block) -> None:
        super().start_block(block)
        self.slots.restart()

    def queue_token(self, i: int, batches: list[int]) -> None:
        blk = self.block
        last = len(blk.layers) - 1
        if any((last, k) not in self.graphs for k in batches) and self.graphs:
            self._drop_graphs()  # a batch not captured before: capture all again, in order
        for k in batches:
            if k not in self.static:
                self.static[k] = {"homes": self._homes(k)}
            self._set_inputs(i, k)
        for j in range(last + 1):
            self.slots.acquire(j)
            for k in batches:
                graph = self.graphs.get((j, k))
                if graph is None:
                    graph = self.graphs[(j, k)] = self._record(j, k)
                graph.replay()
            self.slots.release(j)
        for k in batches:
            self._picked(i, k, blk.pick(self.outs[(last, k)]))

    def _drop_graphs(self) -> None:
        self.graphs.clear()
        self.outs.clear()
        self.pool = None

    def _body(self, j: int, k: int) -> None:
        x = self.static[k]["ids"] if j == 0 else self.outs[(j - 1, k)]
        self.outs[(j, k)] = self._layer(j, k, x, self.slots.weights(j))

    def _record(self, j: int, k: int):
        """Run step (j, k) once for real on a side stream, then capture it. torch.cuda.graph
        would synchronize the device and empty the allocator's cache for each of the L x K
        captures; this capture needs neither (the side stream waits for the compute queued)."""
        compute, side = torch.cuda.current_stream(), self.capture_stream
        side.wait_stream(compute)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            self._body(j, k)
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                self._body(j, k)
            finally:
                graph.capture_end()
        compute.wait_stream(side)
        if self.pool is None:
            self.pool = graph.pool()
        return graph
