"""Pinned host buffers for CPU attention's results, so the main thread need not wait on their copy.

CPU attention needs each GPU batch's new query, key and value on the host and sends its output
back. As synchronous copies from and to pageable memory, each one made the main thread wait for
the copy engine, which is busy with weight pieces: up to 5-8 ms per batch in case C's traces
(rounds 22-23), while that thread should be queueing the next batch's GPU work. Here the output
goes back asynchronously from pinned buffers reused round-robin (a slot is handed out again only
once its attention finished and its output's copy to the GPU completed), and the link gate lets
that copy through between weight pieces; the inputs go to the host as before (see `Slot.stage`).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future

import torch

from flexgen_repro.devices.storage import LINK_GATE

SLOTS = 8   # per shape: at most num_gpu_batches attentions are in flight at once
# How q, k_new, v_new reach the host: "pageable" (the main thread copies them, synchronously),
# "pinned" (asynchronous copies into pinned buffers: slower, see Slot.stage) or "worker" (the
# attention worker makes the pageable copies itself, on a side stream that waits for them to be
# computed, so the main thread never waits; not yet measured on the GPU).
INPUTS = os.environ.get("FLEXGEN_HOST_STAGE_INPUTS", "pageable")
if INPUTS not in ("pageable", "pinned", "worker"):
    raise ValueError(f"FLEXGEN_HOST_STAGE_INPUTS={INPUTS!r}: use pageable, pinned or worker")
_side_streams: dict = {}      # the worker's copy stream, per device


class Slot:
    """One batch's q, k_new, v_new (b, heads, 1, d) on the host (pinned buffers of the slot in
    "pinned" mode) and its pinned output (b, 1, heads * d)."""

    def __init__(self, shape: tuple, dtype: torch.dtype, pin: bool):
        b, heads, _, d = shape
        self.q = self.k_new = self.v_new = None
        if INPUTS == "pinned":
            self.q, self.k_new, self.v_new = (torch.empty(shape, dtype=dtype, pin_memory=pin)
                                              for _ in range(3))
        self.out = torch.empty(b, 1, heads * d, dtype=dtype, pin_memory=pin)
        self.ready: torch.cuda.Event | None = None      # the inputs' copies to the host
        self.read: torch.cuda.Event | None = None       # the output's copy to the GPU
        self.future: Future | None = None                # the attention that uses it
        self.src: tuple | None = None                    # "worker": the GPU inputs to copy

    def wait_free(self) -> None:
        if self.future is not None:
            self.future.exception()                      # finished (its error surfaces elsewhere)
        if self.read is not None:
            self.read.synchronize()
        self.future = self.ready = self.read = self.src = None

    def stage(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """The inputs on the host: by default synchronous copies to pageable memory (the q, k_new,
        v_new attributes become those tensors); in "pinned" mode, asynchronous copies into
        this slot's pinned buffers on the current stream, which `wait_ready` waits for.

        Measured on the H100 (case C, rounds 31-32): the pinned device->host copies queued on the
        compute stream waited for the weight stream's whole host->device copy (14 ms), while the
        pageable ones went through at once; the result's pinned host->device copy, held back by
        the link gate, was not delayed."""
        if INPUTS == "worker" and q.is_cuda:
            self.src = (q, k_new, v_new)       # held until copied: their memory stays theirs
            self.ready = torch.cuda.Event()
            self.ready.record()
            return
        if INPUTS != "pinned" or not q.is_cuda:
            self.q, self.k_new, self.v_new = (t.to("cpu") for t in (q, k_new, v_new))
            return
        for dst, src in ((self.q, q), (self.k_new, k_new), (self.v_new, v_new)):
            dst.copy_(src, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def wait_ready(self) -> None:
        """On the worker, before attending: the inputs are on the host once this returns."""
        if self.src is not None:           # "worker": copy them here, after they are computed
            src, self.src = self.src, None
            dev = src[0].device
            side = _side_streams.get(dev) or _side_streams.setdefault(dev, torch.cuda.Stream(dev))
            with torch.cuda.stream(side):
                side.wait_event(self.ready)
                self.q, self.k_new, self.v_new = (t.to("cpu") for t in src)
            return
        if self.ready is not None:
            self.ready.synchronize()

    def to_device(self, device: torch.device) -> torch.Tensor:
        """The output on `device` (an asynchronous copy on the current stream for the GPU)."""
        if device.type != "cuda":
            return self.out.to(device, copy=True)
        moved = self.out.to(device, non_blocking=True)
        self.read = torch.cuda.Event()
        self.read.record()
        LINK_GATE.register(self.read)   # weight pieces wait for it: see storage.LinkGate
        return moved


class HostStage:
    """The slots of one run, per (shape, dtype); used from the main thread only."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.rings: dict[tuple, deque[Slot]] = {}

    def take(self, shape: tuple, dtype: torch.dtype) -> Slot:
        ring = self.rings.setdefault((tuple(shape), dtype), deque())
        if len(ring) < SLOTS:
            slot = Slot(tuple(shape), dtype, self.pin)
        else:
            slot = ring.popleft()
            slot.wait_free()
        ring.append(slot)
        return slot


class Staged:
    """A CPU attention running on the worker (`slot.future`), with its output in `slot`."""

    def __init__(self, slot: Slot):
        self.slot = slot

    def result(self, device: torch.device) -> torch.Tensor:
        self.slot.future.result()
        return self.slot.to_device(device)
