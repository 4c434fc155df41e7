"""Where bytes live: tensor handles on the GPU, CPU and disk tiers, and row-split (mixed) tensors.

A weight is a `Stored` handle at its home tier; `load(device)` brings it to a compute device.
A KV cache or an activation is a `RowSplit`: its batch rows are cut over the tiers by the policy's
percentages, each part a `Segment` that can be written at sequence positions and read back.
Compressed tensors keep their packed components (data, scale, mn) as plain tensors on the same tier.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from flexgen_repro.policy import Tier

_READ_CHUNK = 64 << 20   # bytes per pread: large sequential reads, several in flight
_READ_THREADS = 4
# Whole-tensor disk reads with O_DIRECT (FLEXGEN_DISK_DIRECT=1): straight from the drive into the
# (pinned) buffer, bypassing the page cache, so a run measures and uses the drive itself rather
# than whatever part of the offload folder the page cache happens to hold (OPT-175B in session 4
# read 119% of its drive's rate for that reason). Off by default: not yet measured on the GPU
# machine. Where the filesystem refuses O_DIRECT, or the data does not start on a block boundary,
# reads are buffered as before.
DISK_DIRECT = os.environ.get("FLEXGEN_DISK_DIRECT", "0") == "1"
_DIRECT_ALIGN = 4096     # O_DIRECT: buffer address, file offset and length in whole blocks
# Host<->GPU copies larger than this go as pieces of this size, at most COPY_IN_FLIGHT queued at a
# time. The copy engine of a direction serves the copies of every stream in the order they were
# queued: a 17 ms weight copy queued whole (or all its pieces at once) held up the compute stream's
# small activation and query copies behind it (case C on an H200: 0.6 s of a 2.2 s decode step).
COPY_CHUNK_BYTES = int(float(os.environ.get("FLEXGEN_COPY_CHUNK_MB", "16")) * (1 << 20))
COPY_IN_FLIGHT = int(os.environ.get("FLEXGEN_COPY_IN_FLIGHT", "2"))


# How a copy thread waits for its own copies: by polling the event or stream with short sleeps
# (FLEXGEN_COPY_POLL_US microseconds; 0: a blocking synchronize). A thread blocked in
# cudaEventSynchronize can keep other threads' CUDA calls (the main thread's queueing, its small
# copies) waiting behind it; a query returns at once. Case C on the H100, side by side in round
# 33: 34.44 tok/s blocking, 36.97 polling every 100 us.
COPY_POLL_S = float(os.environ.get("FLEXGEN_COPY_POLL_US", "100")) * 1e-6


def wait_done(handle) -> None:
    """Wait for a torch.cuda.Event or Stream: polled with sleeps when COPY_POLL_S > 0."""
    if COPY_POLL_S <= 0:
        handle.synchronize()
        return
    while not handle.query():
        time.sleep(COPY_POLL_S)


class LinkGate:
    """Lets small host->GPU copies of the compute stream through a chunked bulk copy.

    A copy thread that keeps COPY_IN_FLIGHT pieces queued never leaves its stream idle, and the
    copy engine kept serving it: a 229 KB attention result queued on the compute stream waited
    for the whole 17 ms weight copy (case C on the H100, round 28's trace). A small copy is
    registered here with an event recorded after it; before queueing each piece, a bulk copy
    waits until every registered small copy is done, so the engine drains the pieces in flight
    and serves the small one next."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list = []
        self.enabled = os.environ.get("FLEXGEN_LINK_GATE", "1") != "0"

    def register(self, event) -> None:
        if self.enabled:
            with self._lock:
                self._pending.append(event)

    def wait_clear(self) -> None:
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for event in pending:
            wait_done(event)


LINK_GATE = LinkGate()


def copy_chunked_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src, non_blocking=True) in pieces of about COPY_CHUNK_BYTES; a copy thread waits
    while COPY_IN_FLIGHT pieces are queued, so other streams' copies queue between them (the main
    thread, which queues compute, never waits on its own copies). Both contiguous, same shape and
    dtype; otherwise, or when small, one copy."""
    nbytes = src.numel() * src.element_size()
    if (nbytes <= COPY_CHUNK_BYTES or dst.shape != src.shape or dst.dtype != src.dtype
            or not (dst.is_contiguous() and src.is_contiguous())):
        return dst.copy_(src, non_blocking=True)
    throttle = (dst.is_cuda or src.is_cuda) and threading.current_thread() is not threading.main_thread()
    step = max(1, COPY_CHUNK_BYTES // src.element_size())
    d, s = dst.view(-1), src.view(-1)
    queued: deque = deque()
    for start in range(0, s.numel(), step):
        if throttle and not dst.is_cpu:
            LINK_GATE.wait_clear()
        d[start:start + step].copy_(s[start:start + step], non_blocking=True)
        if throttle:
            done = torch.cuda.Event()
            done.record()
            queued.append(done)
            if len(queued) > COPY_IN_FLIGHT:
                wait_done(queued.popleft())
    return dst


# Pageable host memory crosses to the GPU at a fraction of the pinned rate: the driver stages it
# through small buffers of its own, one at a time (8.0 against 52.3 GB/s on the H100 machine,
# round 35's profile). Weights kept unpinned (`--pin-weight false`, as OPT-66B runs) therefore go
# through pinned staging buffers of ours: a host copy (torch's, multithreaded) fills one buffer
# while the link drains the ones before. Copies under STAGE_MIN_BYTES go as they are.
# FLEXGEN_STAGE_PAGEABLE=0: the driver's path, for side-by-side runs.
STAGE_PAGEABLE = os.environ.get("FLEXGEN_STAGE_PAGEABLE", "1") != "0"
STAGE_MIN_BYTES = 1 << 20
# Staging blocks are larger than the pieces of pinned copies: each block costs a host copy on the
# copy thread, an event and some Python, and nothing small waits behind them on the link (the
# pieces stay small for the compute stream's copies, LinkGate). OPT-66B with unpinned 4-bit
# weights, H100, two machines: 64 MiB blocks 28.03 vs 25.69 tok/s (round 39b) and 26.33 vs 23.56
# (round 40h), both runs with FLEXGEN_COPY_CHUNK_MB=64 (pieces too). FLEXGEN_STAGE_CHUNK_MB sets it.
STAGE_CHUNK_BYTES = int(float(os.environ.get("FLEXGEN_STAGE_CHUNK_MB", "64")) * (1 << 20))


class _StageRing(threading.local):
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


_STAGE_RING = _StageRing()


def copy_staged_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for a pageable host `src`, through this thread's pinned staging blocks: each
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
        block, i = _STAGE_RING.take(pin=cuda)
        piece = block[:stop - start]
        piece.copy_(s[start:stop])
        if cuda:
            LINK_GATE.wait_clear()
        d[start:stop].copy_(piece, non_blocking=True)
        if cuda:
            done = torch.cuda.Event()
            done.record()
            _STAGE_RING.done[i] = done
    return dst


def _wants_staging(t: torch.Tensor, device: torch.device) -> bool:
    return (STAGE_PAGEABLE and device.type == "cuda" and t.device.type == "cpu"
            and t.numel() * t.element_size() >= STAGE_MIN_BYTES and not t.is_pinned())


def to_device(t: torch.Tensor, device: torch.device, whole: bool = False) -> torch.Tensor:
    """t on `device` (non-blocking; host->GPU in COPY_CHUNK_BYTES pieces, or as one copy when
    `whole`; a large pageable tensor through pinned staging blocks either way)."""
    if t.device == device:
        return t
    if device.type != "cuda" or not t.is_contiguous():
        return t.to(device, non_blocking=True)
    dst = torch.empty(t.shape, dtype=t.dtype, device=device)
    if _wants_staging(t, device):
        return copy_staged_(dst, t)
    if whole:
        return dst.copy_(t, non_blocking=True)
    return copy_chunked_(dst, t)
_NP_OF_TORCH = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                torch.uint8: np.uint8, torch.int64: np.int64}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU NumPy view of `t` (bfloat16 is kept as raw int16 bits, NumPy has no bfloat16)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `to_numpy` for a tensor meant to be `dtype`."""
    if dtype == torch.bfloat16 and a.dtype == np.int16:
        return torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _storage_np_dtype(dtype: torch.dtype):
    return np.int16 if dtype == torch.bfloat16 else _NP_OF_TORCH[dtype]


@dataclass
class DiskFile:
    """A tensor kept as a raw file (np.memmap) in the offload folder."""
    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    npy: bool = False   # a weight folder's np.save file (read in place) rather than a raw memmap
    _offset: int | None = field(default=None, repr=False)

    def memmap(self, mode: str = "r+") -> np.ndarray:
        if self.npy:
            return np.load(self.path, mmap_mode="r")
        return np.memmap(self.path, dtype=_storage_np_dtype(self.dtype), mode=mode, shape=self.shape)

    def read(self, index=None, pin: bool = False) -> torch.Tensor:
        """The tensor (or `index` of it) in host memory; whole reads go straight into a
        (pinned, when asked) buffer with parallel preads, no intermediate copy."""
        if index is None:
            return self._read_whole(pin)
        return from_numpy(np.array(self.memmap("r")[index]), self.dtype)

    def _data_offset(self) -> int:
        """Where the data starts: after the header of an np.save file, 0 for a raw file (parsed
        once: disk weights are read at every token)."""
        if self._offset is None:
            self._offset = int(np.load(self.path, mmap_mode="r").offset) if self.npy else 0
        return self._offset

    def _read_whole(self, pin: bool) -> torch.Tensor:
        offset = self._data_offset()
        direct = DISK_DIRECT and hasattr(os, "O_DIRECT") and offset % _DIRECT_ALIGN == 0
        out = _aligned_empty(self.shape, self.dtype, pin) if direct else \
            torch.empty(self.shape, dtype=self.dtype, pin_memory=pin)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        n = len(view)
        body = n - n % _DIRECT_ALIGN if direct else 0   # whole blocks, read with O_DIRECT
        if body:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:            # the filesystem refuses O_DIRECT: buffered, as before
                body = 0
            else:
                _pread_and_close(fd, view, offset, 0, body, self.path)
        if body < n:
            _pread_and_close(os.open(self.path, os.O_RDONLY), view, offset, body, n, self.path)
        return out

    def write(self, index, value: torch.Tensor) -> None:
        arr = self.memmap("r+")
        arr[index] = to_numpy(value)  # through the page cache; readers see it without a flush

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()


def _aligned_empty(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialized tensor whose data starts on a _DIRECT_ALIGN boundary (a view into a
    slightly larger byte buffer)."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + _DIRECT_ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -raw.data_ptr() % _DIRECT_ALIGN
    return raw[skip:skip + nbytes].view(dtype).view(shape)


def _pread_and_close(fd: int, view: memoryview, offset: int, start: int, stop: int,
                     path: str) -> None:
    """Bytes [start, stop) of `view` from the open file `fd` at `offset + start`, in _READ_CHUNK
    pieces read by up to _READ_THREADS threads; `fd` is closed afterwards, on error too."""
    def pread(span):
        lo, hi = span
        while lo < hi:
            got = os.preadv(fd, [view[lo:hi]], offset + lo)
            if got <= 0:
                raise OSError(f"{path}: short read at byte {offset + lo}")
            lo += got
    try:
        chunks = [(s, min(stop, s + _READ_CHUNK)) for s in range(start, stop, _READ_CHUNK)]
        if len(chunks) == 1:
            pread(chunks[0])
        elif chunks:
            with ThreadPoolExecutor(min(_READ_THREADS, len(chunks))) as pool:
                list(pool.map(pread, chunks))
    finally:
        os.close(fd)


def new_disk_file(folder: str, shape, dtype: torch.dtype, prefix: str = "t") -> DiskFile:
    path = os.path.join(folder, f"{prefix}-{uuid.uuid4().hex[:12]}.bin")
    np.memmap(path, dtype=_storage_np_dtype(dtype), mode="w+", shape=tuple(shape)).flush()
    return DiskFile(path, tuple(shape), dtype)


@dataclass
class Stored:
    """One tensor at its home tier: `data` is a torch tensor (gpu/cpu) or a DiskFile (disk).

    For a compressed tensor, `parts` holds the packed components and `meta` rebuilds it.
    """
    tier: Tier
    data: object = None
    parts: dict[str, "Stored"] = field(default_factory=dict)
    meta: object = None

    @property
    def nbytes(self) -> int:
        if self.parts:
            return sum(p.nbytes for p in self.parts.values())
        if isinstance(self.data, DiskFile):
            return self.data.nbytes
        return self.data.numel() * self.data.element_size()

    def load(self, device: torch.device, pin: bool = False, whole: bool = False):
        """This tensor on `device` (a torch.Tensor, or a CompressedTensor when compressed);
        `whole`: host->GPU as one copy, not in pieces (to_device)."""
        if self.parts:
            from flexgen_repro.compression import CompressedTensor
            comps = {name: p.load(device, pin, whole) for name, p in self.parts.items()}
            return CompressedTensor.from_components(comps, self.meta)
        if isinstance(self.data, DiskFile):
            # a disk read bound for the GPU lands in pinned memory whatever `pin` says: the buffer
            # is transient (torch's pinned-block cache reuses it), and a pageable one would cross
            # the link at a fraction of its speed (`pin` is for weights kept in host memory)
            return to_device(self.data.read(pin=device.type == "cuda"), device, whole)
        return to_device(self.data, device, whole)


class Segment:
    """Rows [start, stop) of a row-split tensor, stored on one tier (rows first; the sequence
    dimension is the store's `seq_dim`)."""

    def __init__(self, tier: Tier, start: int, stop: int, store):
        self.tier, self.start, self.stop, self.store = tier, start, stop, store

    def write(self, pos: int, value) -> None:
        """Write `value` (n positions along the sequence dim) at positions [pos, pos + n)."""
        self.store.write(pos, value)

    def read(self, length: int, device: torch.device):
        """Positions [0, length) on `device`."""
        return self.store.read(length, device)


class PlainStore:
    """Segment storage as one dense tensor on GPU/CPU memory or in a disk file."""

    def __init__(self, buf, seq_dim: int = 1):
        self.buf = buf  # torch.Tensor or DiskFile, rows first
        self.seq_dim = seq_dim

    def _index(self, start: int, stop: int) -> tuple:
        return (slice(None),) * self.seq_dim + (slice(start, stop),)

    def write(self, pos: int, value: torch.Tensor) -> None:
        index = self._index(pos, pos + value.shape[self.seq_dim])
        if isinstance(self.buf, DiskFile):
            self.buf.write(index, value)
            return
        dst = self.buf[index]
        if value.is_cuda and dst.device.type == "cpu" and not dst.is_contiguous():
            # torch copies GPU -> strided host memory through a pageable temporary (slow, and it
            # faults in fresh pages each time): copy into a contiguous pinned block, then scatter
            staged = copy_chunked_(torch.empty(value.shape, dtype=value.dtype, pin_memory=True),
                                   value.contiguous())
            wait_done(torch.cuda.current_stream())
            dst.copy_(staged)
        else:
            copy_chunked_(dst, value)

    def read(self, length: int, device: torch.device) -> torch.Tensor:
        if isinstance(self.buf, DiskFile):
            return self.buf.read(self._index(0, length)).to(device)
        return to_device(self.buf[self._index(0, length)], device)

    def read_whole(self, device: torch.device) -> torch.Tensor:
        """Every position, written or not, of an in-memory buffer on `device`: one contiguous copy
        (a pinned host buffer goes to the GPU at full link speed, where the first `length`
        positions would be strided)."""
        return to_device(self.buf, device)

    @property
    def nbytes(self) -> int:
        if isinstance(self.buf, DiskFile):
            return self.buf.nbytes
        return self.buf.numel() * self.buf.element_size()


class PackedStore:
    """Segment storage of a compressed tensor: one PlainStore per packed component.

    Requires groups along a dimension after the sequence dim, so positions slice every component.
    """

    def __init__(self, stores: dict[str, PlainStore], meta, seq_dim: int):
        self.stores, self.meta, self.seq_dim = stores, meta, seq_dim  # meta: full shape, dtype, config

    def write(self, pos: int, value: torch.Tensor) -> None:
        from flexgen_repro import kernels  # fused quantize kernel on the GPU, else the reference
        packed = kernels.quantize(value, self.meta[2])
        for name, comp in packed.components().items():
            self.stores[name].write(pos, comp)

    def read(self, length: int, device: torch.device):
        from flexgen_repro.compression import CompressedTensor
        shape, dtype, config = self.meta
        comps = {name: s.read(length, device) for name, s in self.stores.items()}
        shape = list(shape)
        shape[self.seq_dim] = length
        return CompressedTensor.from_components(comps, (tuple(shape), dtype, config))

    def read_whole(self, device: torch.device):
        from flexgen_repro.compression import CompressedTensor
        comps = {name: s.read_whole(device) for name, s in self.stores.items()}
        return CompressedTensor.from_components(comps, self.meta)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores.values())


@dataclass
class RowSplit:
    """A tensor whose batch rows are cut over the tiers (the mixed device's tensor)."""
    shape: tuple[int, ...]
    segments: list[Segment]

    def write(self, pos: int, value) -> None:
        for seg in self.segments:
            seg.write(pos, value[seg.start:seg.stop])

    def read_all(self, length: int, device: torch.device) -> torch.Tensor:
        """All rows, positions [0, length), dense on `device` (compressed parts decompressed)."""
        from flexgen_repro.compression import decompress
        parts = []
        for seg in self.segments:
            t = seg.read(length, device)
            parts.append(t if isinstance(t, torch.Tensor) else decompress(t))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
