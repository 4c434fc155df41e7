"""The copy engine: host<->GPU copies in pieces, pinned staging of pageable host memory, and the
link gate that lets the compute stream's small copies through a bulk copy.

A `CopyEngine` belongs to one `ExecutionEnv` (its gate and its per-thread staging rings are that
environment's alone); the functions below take the gate and ring they use as arguments.
Measurements behind the constants: docs/tuning-devices.md.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import torch

# Host<->GPU copies larger than this go as pieces of this size, at most COPY_IN_FLIGHT queued at a
# time, so the copy engine of a direction serves other streams' small copies between them.
COPY_CHUNK_BYTES = 16 << 20
COPY_IN_FLIGHT = 2
# A copy thread waits for its own copies by polling the event or stream with sleeps of this
# length: a thread blocked in a synchronize can hold other threads' CUDA calls behind it.
COPY_POLL_S = 100e-6
# Pageable host tensors of at least STAGE_MIN_BYTES bound for the GPU cross through pinned staging
# blocks of STAGE_CHUNK_BYTES (a host copy fills one block while the link drains the others).
STAGE_MIN_BYTES = 1 << 20
STAGE_CHUNK_BYTES = 64 << 20


_polls = [0]   # wait_done's sleeps since the process started (every thread's; approximate)


def poll_count() -> int:
    """How many times wait_done has slept so far, over all threads: each sleep ends in a wake-up
    that takes the GIL, so the count per second says how often the copy threads interrupt the
    thread that queues the kernels (metrics.PeakMemory records it per run)."""
    return _polls[0]


def wait_done(handle) -> None:
    """Wait for a torch.cuda.Event or Stream, polling with sleeps of COPY_POLL_S."""
    if COPY_POLL_S <= 0:
        handle.synchronize()
        return
    while not handle.query():
        _polls[0] += 1
        time.sleep(COPY_POLL_S)


class LinkGate:
    """Lets small host->GPU copies of the compute stream through a chunked bulk copy.

    A small copy is registered here with an event recorded after it; before queueing each piece,
    a bulk copy waits until every registered small copy is done, so the copy engine drains the
    pieces in flight and serves the small one next."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list = []

    def register(self, event) -> None:
        with self._lock:
            self._pending.append(event)

    def wait_clear(self) -> None:
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for event in pending:
            wait_done(event)


class StageRing(threading.local):
    """A copy thread's staging buffers: COPY_IN_FLIGHT + 1 pinned blocks of STAGE_CHUNK_BYTES, each
    with the event of the last copy that read it (a block is refilled only once that is done)."""

    def __init__(self):
        self.blocks: list[torch.Tensor] = []
        self.done: list = []
        self.next = 0

    def take(self, pin: bool) -> tuple[torch.Tensor, int]:
        if self.blocks and self.blocks[0].numel() < STAGE_CHUNK_BYTES:  # the block size grew
            for done in filter(None, self.done):
                wait_done(done)
            self.blocks = []
        if not self.blocks:
            count = COPY_IN_FLIGHT + 1
            self.blocks = [torch.empty(STAGE_CHUNK_BYTES, dtype=torch.uint8, pin_memory=pin)
                           for _ in range(count)]
            self.done = [None] * count
        i, self.next = self.next, (self.next + 1) % len(self.blocks)
        if self.done[i] is not None:
            wait_done(self.done[i])
            self.done[i] = None
        return self.blocks[i], i


def copy_chunked_(dst: torch.Tensor, src: torch.Tensor, gate: LinkGate | None = None) -> torch.Tensor:
    """dst.copy_(src, non_blocking=True) in pieces of about COPY_CHUNK_BYTES; a copy thread waits
    while COPY_IN_FLIGHT pieces are queued, so other streams' copies queue between them (the main
    thread, which queues compute, never waits on its own copies), and, before each piece bound for
    the GPU, for the small copies registered with `gate`. Both contiguous, same shape and dtype;
    otherwise, or when small, one copy."""
    nbytes = src.numel() * src.element_size()
    if (nbytes <= COPY_CHUNK_BYTES or dst.shape != src.shape or dst.dtype != src.dtype
            or not (dst.is_contiguous() and src.is_contiguous())):
        return dst.copy_(src, non_blocking=True)
    throttle = (dst.is_cuda or src.is_cuda) and threading.current_thread() is not threading.main_thread()
    step = max(1, COPY_CHUNK_BYTES // src.element_size())
    d, s = dst.view(-1), src.view(-1)
    queued: deque = deque()
    for start in range(0, s.numel(), step):
        if throttle and not dst.is_cpu and gate is not None:
            gate.wait_clear()
        d[start:start + step].copy_(s[start:start + step], non_blocking=True)
        if throttle:
            done = torch.cuda.Event()
            done.record()
            queued.append(done)
            if len(queued) > COPY_IN_FLIGHT:
                wait_done(queued.popleft())
    return dst


def copy_staged_(dst: torch.Tensor, src: torch.Tensor, ring: StageRing,
                 gate: LinkGate | None = None) -> torch.Tensor:
    """dst.copy_(src) for a pageable host `src`, through `ring`'s pinned staging blocks: each
    piece is copied into a block on the host, then queued to `dst` asynchronously. Returns before
    the last pieces have crossed, like a non-blocking copy from pinned memory; a block is reused
    only after its copy is done. Both contiguous, same shape and dtype."""
    assert dst.shape == src.shape and dst.dtype == src.dtype
    assert dst.is_contiguous() and src.is_contiguous() and src.device.type == "cpu"
    cuda = dst.is_cuda
    s = src.view(-1).view(torch.uint8)
    d = dst.view(-1).view(torch.uint8)
    for start in range(0, s.numel(), STAGE_CHUNK_BYTES):
        stop = min(start + STAGE_CHUNK_BYTES, s.numel())
        block, i = ring.take(pin=cuda)
        piece = block[:stop - start]
        piece.copy_(s[start:stop])
        if cuda and gate is not None:
            gate.wait_clear()
        d[start:stop].copy_(piece, non_blocking=True)
        if cuda:
            done = torch.cuda.Event()
            done.record()
            ring.done[i] = done
    return dst


def wants_staging(t: torch.Tensor, device: torch.device) -> bool:
    """A large pageable host tensor bound for the GPU crosses through the staging blocks."""
    return (device.type == "cuda" and t.device.type == "cpu"
            and t.numel() * t.element_size() >= STAGE_MIN_BYTES and not t.is_pinned())


class CopyEngine:
    """One environment's link gate and staging rings, and the copies that use them."""

    def __init__(self):
        self.gate = LinkGate()
        self.ring = StageRing()

    def copy_chunked_(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return copy_chunked_(dst, src, self.gate)

    def copy_staged_(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return copy_staged_(dst, src, self.ring, self.gate)

    def to_device(self, t: torch.Tensor, device: torch.device, whole: bool = False) -> torch.Tensor:
        """t on `device` (non-blocking; host->GPU in COPY_CHUNK_BYTES pieces, or as one copy when
        `whole`; a large pageable tensor through pinned staging blocks either way)."""
        if t.device == device:
            return t
        if device.type != "cuda" or not t.is_contiguous():
            return t.to(device, non_blocking=True)
        dst = torch.empty(t.shape, dtype=t.dtype, device=device)
        if wants_staging(t, device):
            return self.copy_staged_(dst, t)
        if whole:
            return dst.copy_(t, non_blocking=True)
        return self.copy_chunked_(dst, t)
