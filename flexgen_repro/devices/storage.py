"""Tensor handles: where one tensor's bytes live, and how they are read and written.

A weight is a `Stored` handle at its home tier; `load(device)` brings it to a compute device.
A KV cache or an activation is a `RowSplit`: its batch rows are cut over the tiers by the policy's
percentages, each part a `Segment` that can be written at sequence positions and read back.
Compressed tensors keep their packed components (data, scale, mn) as plain tensors on the same tier.
Every handle copies through its environment's `CopyEngine`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexgen_repro import trace
from flexgen_repro.devices.copy_engine import CopyEngine, copy_chunked_, wait_done
from flexgen_repro.devices.disk_io import DiskFile, nbytes_of, new_disk_file
from flexgen_repro.policy import Tier

__all__ = ["DiskFile", "PackedStore", "PlainStore", "RowSplit", "Segment", "Stored", "carve",
           "new_disk_file", "packed_layout", "write_to_host"]


@dataclass
class Stored:
    """One tensor at its home tier: `data` is a torch tensor (gpu/cpu) or a DiskFile (disk).

    For a compressed tensor, `parts` holds the packed components and `meta` rebuilds it.
    """
    tier: Tier
    data: object = None
    parts: dict[str, "Stored"] = field(default_factory=dict)
    meta: object = None
    engine: CopyEngine | None = field(default=None, repr=False, compare=False)  # its env's copies

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
        engine = self.engine or CopyEngine()
        if isinstance(self.data, DiskFile):
            if device.type == "cpu" and self.data.io == "mmap":
                return self.data.view()   # read-only, computed on the CPU: the mapped file itself
            mapped = self.data.pinned_view() if device.type == "cuda" else None
            if mapped is not None:        # the page cache straight to the GPU, no host copy
                return engine.to_device(mapped, device, whole)
            # a disk read bound for the GPU lands in pinned memory whatever `pin` says: the buffer
            # is transient (torch's pinned-block cache reuses it), and a pageable one would cross
            # the link at a fraction of its speed (`pin` is for weights kept in host memory)
            with trace.span("disk_read"):
                host = self.data.read(pin=device.type == "cuda")
            return engine.to_device(host, device, whole)
        return engine.to_device(self.data, device, whole)


class Segment:
    """Rows [start, stop) of a row-split tensor, stored on one tier (rows first; the sequence
    dimension is the store's `seq_dim`)."""

    def __init__(self, tier: Tier, start: int, stop: int, store):
        self.tier, self.start, self.stop, self.store = tier, start, stop, store

    @property
    def in_memory(self) -> bool:
        """Uncompressed and held as one tensor in GPU or host memory (not a disk file)."""
        return isinstance(self.store, PlainStore) and isinstance(self.store.buf, torch.Tensor)

    def write(self, pos: int, value, host_writes: list | None = None) -> None:
        """Write `value` (n positions along the sequence dim) at positions [pos, pos + n);
        `host_writes`: collect the writes into host memory there, for `write_to_host`."""
        self.store.write(pos, value, host_writes)

    def read(self, length: int, device: torch.device):
        """Positions [0, length) on `device`."""
        return self.store.read(length, device)


class PlainStore:
    """Segment storage as one dense tensor on GPU/CPU memory or in a disk file."""

    def __init__(self, buf, seq_dim: int = 1, engine: CopyEngine | None = None):
        self.buf = buf  # torch.Tensor or DiskFile, rows first
        self.seq_dim = seq_dim
        self.engine = engine or CopyEngine()

    @property
    def whole_on_cpu(self) -> bool:
        """Whether the CPU should read every position (`read_whole`) rather than the first ones:
        host memory and a mapped disk file are handed out as they are (no copy)."""
        return not isinstance(self.buf, DiskFile) or self.buf.io == "mmap"

    def _index(self, start: int, stop: int) -> tuple:
        return (slice(None),) * self.seq_dim + (slice(start, stop),)

    def write(self, pos: int, value: torch.Tensor, host_writes: list | None = None) -> None:
        index = self._index(pos, pos + value.shape[self.seq_dim])
        if host_writes is not None and isinstance(self.buf, torch.Tensor) and self.buf.is_cpu:
            host_writes.append((self.buf[index], value))
            return
        if isinstance(self.buf, DiskFile):
            self.buf.write(index, on_host(value, self.engine))
            return
        dst = self.buf[index]
        if value.is_cuda and dst.device.type == "cpu" and not dst.is_contiguous():
            dst.copy_(on_host(value, self.engine))
        else:
            self.engine.copy_chunked_(dst, value)

    def read(self, length: int, device: torch.device) -> torch.Tensor:
        if isinstance(self.buf, DiskFile):
            return self._read_disk(self._index(0, length), device)
        return self.engine.to_device(self.buf[self._index(0, length)], device)

    def _read_disk(self, index, device: torch.device) -> torch.Tensor:
        """`index` of the disk file on `device`: a host copy (pinned where bound for the GPU),
        sent on."""
        host = self.buf.read(index, pin=device.type == "cuda")
        return self.engine.to_device(host, device)

    def read_whole(self, device: torch.device, whole: bool = False) -> torch.Tensor:
        """Every position, written or not, of an in-memory buffer on `device`: one contiguous copy
        (a pinned host buffer goes to the GPU at full link speed, where the first `length`
        positions would be strided); a mapped disk file's every position: for the CPU the
        file's long-lived mapping itself, which CPU attention reads once, only where written
        (a copy first read and wrote every position again: 30 ms against 3 ms per layer of an
        OPT-1.3B cache of 16 x 544 positions, docs/tuning-devices.md). `whole`: one host->GPU
        copy, not pieces (policy.whole_copies)."""
        if isinstance(self.buf, DiskFile):
            if device.type == "cpu" and self.buf.io == "mmap":
                return self.buf.view()
            return self._read_disk(None, device)
        return self.engine.to_device(self.buf, device, whole)

    @property
    def nbytes(self) -> int:
        if isinstance(self.buf, DiskFile):
            return self.buf.nbytes
        return self.buf.numel() * self.buf.element_size()


class PackedStore:
    """Segment storage of a compressed tensor: one PlainStore per packed component.

    Requires groups along a dimension after the sequence dim, so positions slice every component.
    """

    def __init__(self, stores: dict[str, PlainStore], meta, seq_dim: int,
                 buffer: torch.Tensor | None = None, layout: list | None = None):
        self.stores, self.meta, self.seq_dim = stores, meta, seq_dim  # meta: full shape, dtype, config
        # where the components are views of one host buffer (`carve(buffer, layout)`), a read of
        # every position to the GPU is one copy of it instead of one per component
        self.buffer, self.layout = buffer, layout

    def write(self, pos: int, value: torch.Tensor, host_writes: list | None = None) -> None:
        from flexgen_repro import kernels  # fused quantize kernel on the GPU, else the reference
        packed = kernels.quantize(value, self.meta[2])
        for name, comp in packed.components().items():
            self.stores[name].write(pos, comp, host_writes)

    def read(self, length: int, device: torch.device):
        from flexgen_repro.compression import CompressedTensor
        shape, dtype, config = self.meta
        comps = {name: s.read(length, device) for name, s in self.stores.items()}
        shape = list(shape)
        shape[self.seq_dim] = length
        return CompressedTensor.from_components(comps, (tuple(shape), dtype, config))

    @property
    def whole_on_cpu(self) -> bool:
        return all(s.whole_on_cpu for s in self.stores.values())

    def read_whole(self, device: torch.device, whole: bool = False):
        from flexgen_repro.compression import CompressedTensor
        if self.buffer is not None:
            engine = next(iter(self.stores.values())).engine
            comps = carve(engine.to_device(self.buffer, device, whole), self.layout)
        else:
            comps = {name: s.read_whole(device, whole) for name, s in self.stores.items()}
        return CompressedTensor.from_components(comps, self.meta)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores.values())


@dataclass
class RowSplit:
    """A tensor whose batch rows are cut over the tiers (the mixed device's tensor)."""
    shape: tuple[int, ...]
    segments: list[Segment]

    def write(self, pos: int, value, host_writes: list | None = None) -> None:
        """`value`'s rows into the segments at positions [pos, pos + n). `host_writes`: the
        writes into host memory are appended there as (destination, source) instead of made, for
        one `write_to_host` of several small writes; the others are made now."""
        for seg in self.segments:
            seg.write(pos, value[seg.start:seg.stop], host_writes)

    def buffer(self):
        """The home buffer of a one-segment tensor: the tensor itself where plain, a
        CompressedTensor over its packed components where compressed."""
        (seg,) = self.segments
        store = seg.store
        if isinstance(store, PlainStore):
            return store.buf
        from flexgen_repro.compression import CompressedTensor
        return CompressedTensor.from_components({name: s.buf for name, s in store.stores.items()},
                                                store.meta)

    def prefix(self, length: int) -> "RowSplit":
        """Positions [0, length) as a RowSplit sharing this one's memory (writes and reads go to
        the same buffers). Only for in-memory, uncompressed segments (ValueError otherwise)."""
        segments = []
        for seg in self.segments:
            store = seg.store
            if not seg.in_memory:
                raise ValueError("only an in-memory, uncompressed tensor has prefix views")
            view = PlainStore(store.buf.narrow(store.seq_dim, 0, length), store.seq_dim, store.engine)
            segments.append(Segment(seg.tier, seg.start, seg.stop, view))
        dim = self.segments[0].store.seq_dim
        return RowSplit(self.shape[:dim] + (length,) + self.shape[dim + 1:], segments)

    def read_all(self, length: int, device: torch.device) -> torch.Tensor:
        """All rows, positions [0, length), dense on `device` (compressed parts decompressed)."""
        from flexgen_repro.compression import decompress
        parts = []
        for seg in self.segments:
            t = seg.read(length, device)
            parts.append(t if isinstance(t, torch.Tensor) else decompress(t))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def on_host(value: torch.Tensor, engine: CopyEngine | None = None) -> torch.Tensor:
    """A GPU tensor as a contiguous pinned host copy (waited for), a host tensor as it is. torch
    copies a GPU tensor into strided or mapped host memory through a fresh pageable temporary,
    whose pages it faults in every time (a prefill's cache store into a mapped file: 23 ms per
    OPT-1.3B K or V of 16 x 512 positions on an H100 machine)."""
    if not value.is_cuda:
        return value
    staged = copy_chunked_(torch.empty(value.shape, dtype=value.dtype, pin_memory=True),
                           value.contiguous(), engine.gate if engine else None)
    wait_done(torch.cuda.current_stream())
    return staged


BUFFER_ALIGN = 64   # bytes: every component of a packed buffer starts at a multiple of this


def packed_layout(components: list[tuple[object, tuple, torch.dtype]],
                  align: int = BUFFER_ALIGN) -> tuple[list, int]:
    """(name, shape, dtype) of each component -> (layout for `carve`, the buffer's bytes): the
    components one after the other, each at an offset aligned to `align` bytes."""
    layout, offset = [], 0
    for name, shape, dtype in components:
        layout.append((name, tuple(shape), dtype, offset))
        offset += -(-nbytes_of(shape, dtype) // align) * align
    return layout, offset


def carve(buffer: torch.Tensor, layout: list) -> dict:
    """The components laid out in a one-dimensional uint8 `buffer` (packed_layout), as views."""
    out = {}
    for name, shape, dtype, offset in layout:
        out[name] = buffer[offset:offset + nbytes_of(shape, dtype)].view(dtype).view(shape)
    return out


def write_to_host(writes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Small writes into host memory, (destination, source) each, made as one: the sources'
    bytes gathered on their device, one copy of them to pinned host memory, one wait, then each
    destination written on the host. A decode step's cache store is six such writes (data, scale
    and mn of K and V) of one position each: one wait, not six, and the store thread wakes (and
    takes the interpreter lock from the thread queueing compute) once per store."""
    by_device: dict = {}
    for dst, src in writes:
        by_device.setdefault(src.device, []).append((dst, src))
    for group in by_device.values():
        flat = [src.contiguous().view(-1).view(torch.uint8) for _, src in group]
        host = on_host(torch.cat(flat) if len(flat) > 1 else flat[0])
        start = 0
        for (dst, src), piece in zip(group, flat):
            stop = start + piece.numel()
            raw = host[start:stop]
            if start % src.element_size():  # after an odd number of bytes: realigned by a copy
                raw = raw.clone()
            dst.copy_(raw.view(src.dtype).view(src.shape))
            start = stop
