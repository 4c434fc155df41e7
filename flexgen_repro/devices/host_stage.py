"""Pinned host buffers for CPU attention's results, so the main thread need not wait on their copy.

CPU attention needs each GPU batch's new query, key and value on the host and sends its output
back. The inputs go to the host as synchronous copies from the main thread (pageable copies pass
the copy engine at once, where pinned ones queued behind the weight stream's bulk copy); the
output goes back asynchronously from pinned buffers reused round-robin (a slot is handed out again
only once its attention finished and its output's copy to the GPU completed), and the link gate
lets that copy through between weight pieces.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future

import torch

from flexgen_repro.devices.copy_engine import LinkGate

SLOTS = 8   # per shape: at most num_gpu_batches attentions are in flight at once


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors (one dtype) in host memory, contiguous: from the GPU as one synchronous copy
    of their bytes gathered there (a decode step's query, key and value: one wait, not three);
    host tensors as they are."""
    if not any(t.is_cuda for t in tensors):
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).to("cpu")
    pieces = flat.split([t.numel() for t in tensors])
    return tuple(piece.view(t.shape) for piece, t in zip(pieces, tensors))


class Slot:
    """One batch's q, k_new, v_new (b, heads, 1, d) on the host and its pinned output
    (b, 1, heads * d)."""

    def __init__(self, shape: tuple, dtype: torch.dtype, pin: bool, gate: LinkGate | None = None):
        b, heads, _, d = shape
        self.q = self.k_new = self.v_new = None
        self.out = torch.empty(b, 1, heads * d, dtype=dtype, pin_memory=pin)
        self.gate = gate
        self.read: torch.cuda.Event | None = None       # the output's copy to the GPU
        self.future: Future | None = None                # the attention that uses it

    def wait_free(self) -> None:
        if self.future is not None:
            self.future.exception()                      # finished (its error surfaces elsewhere)
        if self.read is not None:
            self.read.synchronize()
        self.future = self.read = None

    def stage(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """The inputs on the host (to_host)."""
        self.q, self.k_new, self.v_new = to_host(q, k_new, v_new)

    def wait_ready(self) -> None:
        """On the worker, before attending: the inputs are on the host once `stage` returned."""

    def to_device(self, device: torch.device) -> torch.Tensor:
        """The output on `device` (an asynchronous copy on the current stream for the GPU)."""
        if device.type != "cuda":
            return self.out.to(device, copy=True)
        moved = self.out.to(device, non_blocking=True)
        self.read = torch.cuda.Event()
        self.read.record()
        if self.gate is not None:
            self.gate.register(self.read)   # weight pieces wait for it: see copy_engine.LinkGate
        return moved


class HostStage:
    """The slots of one run, per (shape, dtype); used from the main thread only."""

    def __init__(self, pin: bool, gate: LinkGate | None = None):
        self.pin, self.gate = pin, gate
        self.rings: dict[tuple, deque[Slot]] = {}

    def take(self, shape: tuple, dtype: torch.dtype) -> Slot:
        ring = self.rings.setdefault((tuple(shape), dtype), deque())
        if len(ring) < SLOTS:
            slot = Slot(tuple(shape), dtype, self.pin, self.gate)
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
