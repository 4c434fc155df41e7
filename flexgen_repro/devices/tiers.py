"""The tiers: GPU and CPU memory (`MemDevice`), the offload folder (`DiskDevice`) and the mixed
device that splits one tensor's batch rows over the three (`MixedDevice`).

On a machine without CUDA the GPU tier is backed by host memory, so every policy runs anywhere.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import TYPE_CHECKING

import torch

from flexgen_repro.devices.copy_engine import CopyEngine
from flexgen_repro.devices.disk_io import (PAGE_CACHE_SHARE, DiskFile, available_memory,
                                           host_register, host_unregister, nbytes_of,
                                           new_disk_file, resolve_io_mode)
from flexgen_repro.devices.storage import (PackedStore, PlainStore, RowSplit, Segment, Stored, carve,
                                           packed_layout)
from flexgen_repro.policy import Tier, split_rows

if TYPE_CHECKING:
    from flexgen_repro.devices.env import ExecutionEnv


class MemDevice:
    """GPU or CPU memory. CPU tensors are pinned (when asked) only where CUDA exists.

    Large pinned buffers are ordinary allocations registered with CUDA (cudaHostRegister) rather
    than torch's pinned allocator, which rounds every block up to a power of two (+25% host memory
    for OPT's weight shapes); `release` or `close` unregisters them.
    """

    REGISTER_MIN_BYTES = 8 << 20

    def __init__(self, tier: Tier, device: torch.device, can_pin: bool,
                 engine: CopyEngine | None = None):
        self.tier, self.dev, self.can_pin = tier, device, can_pin
        self.engine = engine or CopyEngine()
        self._registered: dict[int, int] = {}  # data_ptr -> bytes
        self._warned_unpinned = False            # a refused registration has been reported
        self._lock = threading.Lock()

    def alloc(self, shape, dtype: torch.dtype, pin: bool = False,
              long_lived: bool = True) -> torch.Tensor:
        """`long_lived` pinned buffers are registered (exact size); short-lived ones come from
        torch's pinned allocator, which reuses its blocks. A large buffer whose registration is
        refused stays pageable (copies to the GPU stage it through pinned blocks) rather than
        take the pinned allocator's power-of-two rounding, up to twice its bytes."""
        pin = pin and self.can_pin and self.dev.type == "cpu"
        if not pin:
            return torch.empty(tuple(shape), dtype=dtype, device=self.dev)
        if long_lived:
            t = torch.empty(tuple(shape), dtype=dtype)
            nbytes = t.numel() * t.element_size()
            if nbytes >= self.REGISTER_MIN_BYTES:
                if not self._register(t.data_ptr(), nbytes):
                    self._warn_unpinned(nbytes)
                return t
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)

    def _register(self, ptr: int, nbytes: int) -> bool:
        if not host_register(ptr, nbytes):
            return False  # e.g. too little memory left to lock
        with self._lock:
            self._registered[ptr] = nbytes
        return True

    def _warn_unpinned(self, nbytes: int) -> None:
        with self._lock:
            first, self._warned_unpinned = not self._warned_unpinned, True
        if first:
            warnings.warn(f"CUDA refused to pin a {nbytes / 2**20:.0f} MiB host buffer "
                          f"(cudaHostRegister): it, and any other it refuses, stays pageable and "
                          f"crosses to the GPU through staging buffers, more slowly; less in host "
                          f"memory (--percent) or more memory free lets it pin",
                          RuntimeWarning, stacklevel=3)

    def release(self, t: torch.Tensor) -> None:
        """Unregister a buffer this device registered (before its memory is freed)."""
        with self._lock:
            registered = self._registered.pop(t.data_ptr(), None)
        if registered is not None:
            host_unregister(t.data_ptr())

    def close(self) -> None:
        with self._lock:
            ptrs, self._registered = list(self._registered), {}
        for ptr in ptrs:
            host_unregister(ptr)

    def put(self, t: torch.Tensor, pin: bool = False) -> Stored:
        buf = self.alloc(t.shape, t.dtype, pin)
        buf.copy_(t)
        return Stored(self.tier, buf, engine=self.engine)


class DiskDevice:
    """Tensors as files in the offload folder; files it wrote are removed on close.

    `io_mode` is how its files are read and written ("direct", "buffered" or "mmap", see
    disk_io), decided once from the asked-for `disk_io` ("auto": by probing the folder);
    `io_reason` says why. Under "auto" on a drive that accepts O_DIRECT, each file is decided
    when it is made: mapped while the tier's mapped bytes fit in PAGE_CACHE_SHARE of the memory
    available (the page cache then serves them at memory speed, several times the drive's), with
    O_DIRECT beyond (a tier larger than memory streams from the drive without evicting the
    mapped files). `bytes_by_mode` counts the bytes of each mode."""

    tier = Tier.DISK

    def __init__(self, folder: str, disk_io: str = "buffered", engine: CopyEngine | None = None):
        self.folder = folder
        self.engine = engine or CopyEngine()
        self._owned: list[str] = []
        self._files: dict[int, DiskFile] = {}   # handed out (by id): closed on close
        self._lock = threading.Lock()
        os.makedirs(folder, exist_ok=True)
        self.io_mode, self.io_reason = resolve_io_mode(folder, disk_io)
        self._per_file = disk_io == "auto" and self.io_mode == "direct"
        self.bytes_by_mode: dict[str, int] = {}

    def _mode_for(self, nbytes: int) -> str:
        """The io mode of a new file of `nbytes` (counted in bytes_by_mode)."""
        with self._lock:
            mode = self.io_mode
            if self._per_file:
                mapped = self.bytes_by_mode.get("mmap", 0)
                if mapped + nbytes <= PAGE_CACHE_SHARE * available_memory():
                    mode = "mmap"
            self.bytes_by_mode[mode] = self.bytes_by_mode.get(mode, 0) + nbytes
            return mode

    def describe(self) -> str:
        """How this tier reads and writes, and how many bytes went each way."""
        used = ", ".join(f"{mode} {n / (1 << 30):.2f} GiB" for mode, n in
                         sorted(self.bytes_by_mode.items()))
        return self.io_reason + (f"; {used}" if used else "")

    def alloc(self, shape, dtype: torch.dtype, pin: bool = False, long_lived: bool = True) -> DiskFile:
        os.makedirs(self.folder, exist_ok=True)
        f = new_disk_file(self.folder, shape, dtype, io=self._mode_for(nbytes_of(shape, dtype)))
        with self._lock:
            self._owned.append(f.path)
            self._files[id(f)] = f
        return f

    def file(self, path: str, shape, dtype: torch.dtype, npy: bool = False) -> DiskFile:
        """A handle on an existing file (e.g. a weight folder's), read in this device's mode."""
        f = DiskFile(path, tuple(shape), dtype, npy=npy, io=self._mode_for(nbytes_of(shape, dtype)))
        with self._lock:
            self._files[id(f)] = f
        return f

    def put(self, t: torch.Tensor, pin: bool = False) -> Stored:
        f = self.alloc(t.shape, t.dtype)
        f.write(Ellipsis, t)
        return Stored(Tier.DISK, f, engine=self.engine)

    def free(self, f: DiskFile) -> None:
        """Remove one file this device wrote."""
        f.close()
        with self._lock:
            if f.path in self._owned:
                self._owned.remove(f.path)
            self._files.pop(id(f), None)
        if os.path.exists(f.path):
            os.remove(f.path)

    def close(self) -> None:
        with self._lock:
            owned, self._owned = self._owned, []
            files, self._files = list(self._files.values()), {}
        for f in files:
            f.close()
        for path in owned:
            if os.path.exists(path):
                os.remove(path)


class MixedDevice:
    """Tensors whose batch rows are split over the three tiers by percentage."""

    def __init__(self, env: "ExecutionEnv"):
        self.env = env

    def alloc(self, shape, dtype: torch.dtype, percents, pin: bool = False,
              compression=None, seq_dim: int = 1, long_lived: bool = True,
              zero: bool = False) -> RowSplit:
        """A tensor with rows (dim 0) split by `percents` (gpu, cpu, disk); positions along
        `seq_dim` are what `write`/`read` address. `compression` groups must lie after seq_dim."""
        segments = []
        for tier, start, stop in split_rows(shape[0], percents):
            seg_shape = (stop - start,) + tuple(shape[1:])
            device = self.env.device(tier)
            if compression is None:
                buf = device.alloc(seg_shape, dtype, pin, long_lived)
                if zero and isinstance(buf, torch.Tensor):  # disk files start zero-filled
                    buf.zero_()
                store = PlainStore(buf, seq_dim, self.env.engine)
            else:
                store = self._packed_store(device, seg_shape, dtype, compression, pin, seq_dim)
                if zero:  # unwritten positions must decode to finite values (masked, but 0 * NaN)
                    for part in store.stores.values():
                        if isinstance(part.buf, torch.Tensor):
                            part.buf.zero_()
            segments.append(Segment(tier, start, stop, store))
        return RowSplit(tuple(shape), segments)

    def free(self, t: RowSplit) -> None:
        """Release a row-split tensor: its disk files are removed and its registered host
        buffers unregistered now (memory goes with the last reference)."""
        for seg in t.segments:
            stores = seg.store.stores.values() if isinstance(seg.store, PackedStore) else [seg.store]
            for store in stores:
                if isinstance(store.buf, DiskFile):
                    self.env.disk.free(store.buf)
                elif seg.tier == Tier.CPU:
                    self.env.cpu.release(store.buf)

    def _packed_store(self, device, shape, dtype, config, pin, seq_dim) -> PackedStore:
        from flexgen_repro.compression import compress
        probe_shape = list(shape)
        probe_shape[0] = probe_shape[seq_dim] = 1
        probe = compress(torch.zeros(probe_shape, dtype=torch.float32), config)
        parts = []
        for name, comp in probe.components().items():
            comp_shape = list(comp.shape)
            comp_shape[0], comp_shape[seq_dim] = shape[0], shape[seq_dim]
            parts.append((name, tuple(comp_shape), comp.dtype if comp.dtype == torch.uint8 else dtype))
        meta = (tuple(shape), dtype, config)
        if device.tier == Tier.CPU:
            # host memory: the components as views of one buffer, so a load to the GPU is one copy
            layout, nbytes = packed_layout(parts)
            buffer = device.alloc((nbytes,), torch.uint8, pin)
            stores = {name: PlainStore(view, seq_dim, self.env.engine)
                      for name, view in carve(buffer, layout).items()}
            return PackedStore(stores, meta, seq_dim, buffer, layout)
        stores = {name: PlainStore(device.alloc(comp_shape, comp_dtype, pin), seq_dim, self.env.engine)
                  for name, comp_shape, comp_dtype in parts}
        return PackedStore(stores, meta, seq_dim)
