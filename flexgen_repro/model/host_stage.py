"""Pinned host buffers for CPU attention, so the main thread never waits on a copy.

CPU attention needs each GPU batch's new query, key and value on the host and sends its output
back. As synchronous copies from and to pageable memory, each one made the main thread wait for
the copy engine, which is busy with weight pieces: up to 5-8 ms per batch in case C's traces
(rounds 22-23), while that thread should be queueing the next batch's GPU work. Here the copies
are asynchronous, into and out of pinned buffers reused round-robin: the attention worker waits
for the inputs' event, and a slot is handed out again only once the work that used it is done
(its attention finished and its output's copy to the GPU completed).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future

import torch

from flexgen_repro.devices.storage import LINK_GATE

SLOTS = 8   # per shape: at most num_gpu_batches attentions are in flight at once


class Slot:
    """One batch's pinned q, k_new, v_new (b, heads, 1, d) and output (b, 1, heads * d)."""

    def __init__(self, shape: tuple, dtype: torch.dtype, pin: bool):
        b, heads, _, d = shape
        self.q, self.k_new, self.v_new = (torch.empty(shape, dtype=dtype, pin_memory=pin)
                                          for _ in range(3))
        self.out = torch.empty(b, 1, heads * d, dtype=dtype, pin_memory=pin)
        self.ready: torch.cuda.Event | None = None      # the inputs' copies to the host
        self.read: torch.cuda.Event | None = None       # the output's copy to the GPU
        self.future: Future | None = None                # the attention that uses it

    def wait_free(self) -> None:
        if self.future is not None:
            self.future.exception()                      # finished (its error surfaces elsewhere)
        if self.read is not None:
            self.read.synchronize()
        self.future = self.ready = self.read = None

    def stage(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Queue the copies to the host on the current stream; `wait_ready` waits for them."""
        for dst, src in ((self.q, q), (self.k_new, k_new), (self.v_new, v_new)):
            dst.copy_(src, non_blocking=True)
        if q.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def wait_ready(self) -> None:
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
    """A CPU attention running on the worker, with its output in `slot`."""

    def __init__(self, future: Future, slot: Slot):
        self.future, self.slot = future, slot

    def result(self, device: torch.device) -> torch.Tensor:
        self.future.result()
        return self.slot.to_device(device)
