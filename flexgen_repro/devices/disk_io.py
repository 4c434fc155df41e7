"""The disk tier's files and how their bytes are read and written.

A `DiskFile` is one tensor kept as a raw file in the offload folder (or a weight folder's np.save
file, read in place). Its `io` mode, decided by the disk device (`resolve_io_mode`, and under "auto" per file
by how much of the tier the page cache can hold: DiskDevice):
- "direct": whole-tensor reads and writes with O_DIRECT, straight between the drive and aligned
  (pinned where CUDA exists) buffers, several requests in flight; bytes that do not fill a block
  go through the page cache;
- "buffered": through the page cache, whole reads as parallel preads;
- "mmap": reads map the file (one long-lived mapping per file): a weight computed on the CPU is a
  view of the mapping (no copy); a weight bound for the GPU crosses straight out of the mapping,
  registered with CUDA (`DiskFile.pinned_view`: page-locked, read-only), with no copy on the host;
  any other read is one copy out of it. Writes of "buffered" and "mmap" go through the page cache.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

READ_CHUNK = 64 << 20      # bytes per request: large sequential requests, several in flight
IO_THREADS = 4
# "auto": files are mapped while the tier's mapped bytes stay within this share of the memory
# available (the rest of it is left to the host tier and the process)
PAGE_CACHE_SHARE = 0.5
DIRECT_ALIGN = 4096        # O_DIRECT: buffer address, file offset and length in whole blocks
_HOST_REGISTER_READ_ONLY = 8   # cudaHostRegisterReadOnly: the GPU only reads the pages
# filesystems that live in memory or on top of another one: O_DIRECT there measures nothing
_NOT_A_DRIVE = {"tmpfs", "ramfs", "overlay", "overlayfs", "squashfs", "fuse", "9p", "nfs", "nfs4",
                "devtmpfs", "aufs"}

_NP_OF_TORCH = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                torch.uint8: np.uint8, torch.int64: np.int64, torch.int8: np.int8,
                torch.int32: np.int32, torch.int16: np.int16}


def storage_np_dtype(dtype: torch.dtype):
    return np.int16 if dtype == torch.bfloat16 else _NP_OF_TORCH[dtype]


@dataclass
class DiskFile:
    """A tensor kept as a file in the offload folder, read and written in `io` mode."""
    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    npy: bool = False   # a weight folder's np.save file (read in place) rather than a raw file
    io: str = "buffered"
    _offset: int | None = field(default=None, repr=False)
    _map: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _registered: int | None = field(default=None, repr=False)   # first registered page
    _register_tried: bool = field(default=False, repr=False)

    def memmap(self, mode: str = "r+") -> np.ndarray:
        """A fresh mapping of the file (np.load's for an np.save file)."""
        if self.npy:
            return np.load(self.path, mmap_mode="c" if mode != "r" else "r")
        return np.memmap(self.path, dtype=storage_np_dtype(self.dtype), mode=mode, shape=self.shape)

    def mapped(self) -> np.ndarray:
        """This file's one long-lived writable mapping (private for an np.save file)."""
        if self._map is None:
            with self._lock:
                return self._mapped_locked()
        return self._map

    def view(self, index=None) -> torch.Tensor:
        """The mapped tensor (or `index` of it): no copy, shares the file's pages."""
        arr = self.mapped() if index is None else self.mapped()[index]
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def read(self, index=None, pin: bool = False) -> torch.Tensor:
        """The tensor (or `index` of it) in host memory: its own buffer (pinned when asked). In
        "mmap" mode a whole read is one copy from the mapping; otherwise whole reads go straight
        into the buffer with parallel requests (O_DIRECT in "direct" mode)."""
        if self.io == "mmap" or index is not None:
            src = self.view(index)
            out = torch.empty(src.shape, dtype=self.dtype, pin_memory=pin)
            return out.copy_(src)
        return self._read_whole(pin)

    def pinned_view(self) -> torch.Tensor | None:
        """The mapped tensor, registered with CUDA (once; page-locked and read-only for the GPU),
        so a copy of it to the GPU reads the page cache directly with no host copy. None where
        that cannot be: not "mmap" mode, no CUDA, or the registration refused (the caller then
        reads into pinned memory). The file must not change while registered: weights only."""
        if self.io != "mmap":
            return None
        if self._register_tried:   # every load after the first
            return self.view() if self._registered is not None else None
        if not torch.cuda.is_available():
            return None
        with self._lock:
            if not self._register_tried:
                self._registered = _register_mapping(self._mapped_locked(), shared=not self.npy)
                self._register_tried = True
            if self._registered is None:
                return None
        return self.view()

    def _mapped_locked(self) -> np.ndarray:
        if self._map is None:
            self._map = self.memmap("r+")
        return self._map

    def close(self) -> None:
        """Unregister and drop the long-lived mapping (the file stays)."""
        with self._lock:
            if self._registered is not None:
                host_unregister(self._registered)
                self._registered = None
            self._register_tried = False
            self._map = None

    def _data_offset(self) -> int:
        """Where the data starts: after the header of an np.save file, 0 for a raw file (parsed
        once: disk weights are read at every token)."""
        if self._offset is None:
            self._offset = int(np.load(self.path, mmap_mode="r").offset) if self.npy else 0
        return self._offset

    def _read_whole(self, pin: bool) -> torch.Tensor:
        offset = self._data_offset()
        direct = self.io == "direct" and offset % DIRECT_ALIGN == 0
        out = aligned_empty(self.shape, self.dtype, pin) if direct else \
            torch.empty(self.shape, dtype=self.dtype, pin_memory=pin)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        n = len(view)
        body = n - n % DIRECT_ALIGN if direct else 0   # whole blocks, read with O_DIRECT
        if body:
            fd = _open_direct(self.path, os.O_RDONLY)
            if fd is None:             # the filesystem refuses O_DIRECT: buffered
                body = 0
            else:
                _transfer_and_close(fd, view, offset, 0, body, self.path, write=False)
        if body < n:
            _transfer_and_close(os.open(self.path, os.O_RDONLY), view, offset, body, n, self.path,
                                write=False)
        return out

    def write(self, index, value: torch.Tensor) -> None:
        """Write `value` at `index` (Ellipsis: the whole tensor). A whole write in "direct" mode
        goes from an aligned copy with O_DIRECT; every other write through the page cache (readers
        see it without a flush; an O_DIRECT read writes dirty pages back first)."""
        if index is Ellipsis and self.io == "direct" and not self.npy:
            self._write_whole_direct(value)
            return
        # torch's copy, not NumPy's assignment: it spreads the copy (and the first touch of
        # fresh file pages, which dominates a prefill's cache stores) over the intra-op threads
        self.view(index).copy_(value)

    def _write_whole_direct(self, value: torch.Tensor) -> None:
        buf = aligned_empty(self.shape, self.dtype, pin=False)
        buf.copy_(value.reshape(self.shape))
        view = memoryview(buf.view(-1).view(torch.uint8).numpy())
        n = len(view)
        body = n - n % DIRECT_ALIGN
        fd = _open_direct(self.path, os.O_WRONLY) if body else None
        if fd is None:
            body = 0
        else:
            _transfer_and_close(fd, view, 0, 0, body, self.path, write=True)
        if body < n:
            _transfer_and_close(os.open(self.path, os.O_WRONLY), view, 0, body, n, self.path,
                                write=True)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


def host_register(ptr: int, nbytes: int, flags: int = 0) -> bool:
    """cudaHostRegister; False where refused (this thread's CUDA error then cleared)."""
    if int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, flags)) == 0:
        return True
    _clear_last_cuda_error()
    return False


def _clear_last_cuda_error() -> None:
    """Reset this thread's last CUDA error (cudaGetLastError): a refused registration leaves its
    error there, where torch's next kernel-launch check would raise it. Through the CUDA runtime
    library the process has loaded; nothing to do where none is found."""
    global _CUDART
    if _CUDART is None:
        import ctypes
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
            _CUDART = ctypes.CDLL(sorted(paths)[0]) if paths else False
        except OSError:
            _CUDART = False
    if _CUDART:
        _CUDART.cudaGetLastError()


_CUDART = None   # the loaded CUDA runtime library (ctypes), False where none was found


def host_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def _is_pinned(t: torch.Tensor) -> bool:
    return t.is_pinned()


def _register_mapping(arr: np.ndarray, shared: bool) -> int | None:
    """Register `arr`'s bytes (a mapping) with CUDA, read-only; a shared mapping (a raw file) may
    fall back to a plain registration where read-only ones are not supported, a private one (an
    np.save file mapped copy-on-write) may not: pinning it writable would copy every page. Not
    where it would pin more than PAGE_CACHE_SHARE of the memory still available. The
    start of the registered pages, or None when refused or when torch does not then see the
    data as pinned."""
    if arr.nbytes == 0 or arr.nbytes > PAGE_CACHE_SHARE * available_memory():
        return None   # pinned pages cannot be evicted: leave at least as much memory as it takes
    # whole pages: an np.save file's data starts after its header, inside the mapping's first page
    start = arr.ctypes.data - arr.ctypes.data % mmap.PAGESIZE
    nbytes = -(-(arr.ctypes.data + arr.nbytes - start) // mmap.PAGESIZE) * mmap.PAGESIZE
    if not host_register(start, nbytes, _HOST_REGISTER_READ_ONLY):
        if not (shared and host_register(start, nbytes, 0)):
            return None
    if not _is_pinned(torch.from_numpy(arr.reshape(-1)[:1])):
        host_unregister(start)
        return None
    return start


def nbytes_of(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of `shape` and `dtype`."""
    return int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def aligned_empty(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialized tensor whose data starts on a DIRECT_ALIGN boundary (a view into a
    slightly larger byte buffer)."""
    nbytes = nbytes_of(shape, dtype)
    raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -raw.data_ptr() % DIRECT_ALIGN
    return raw[skip:skip + nbytes].view(dtype).view(shape)


def _open_direct(path: str, flags: int) -> int | None:
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError:
        return None


def _transfer_and_close(fd: int, view: memoryview, offset: int, start: int, stop: int,
                        path: str, write: bool) -> None:
    """Bytes [start, stop) of `view` from (or to) the open file `fd` at `offset + start`, in
    READ_CHUNK requests made by up to IO_THREADS threads; `fd` is closed afterwards, on error too."""
    def one(span):
        lo, hi = span
        while lo < hi:
            if write:
                done = os.pwritev(fd, [view[lo:hi]], offset + lo)
            else:
                done = os.preadv(fd, [view[lo:hi]], offset + lo)
            if done <= 0:
                raise OSError(f"{path}: short {'write' if write else 'read'} at byte {offset + lo}")
            lo += done
    try:
        chunks = [(s, min(stop, s + READ_CHUNK)) for s in range(start, stop, READ_CHUNK)]
        if len(chunks) == 1:
            one(chunks[0])
        elif chunks:
            with ThreadPoolExecutor(min(IO_THREADS, len(chunks))) as pool:
                list(pool.map(one, chunks))
    finally:
        os.close(fd)


def new_disk_file(folder: str, shape, dtype: torch.dtype, prefix: str = "t",
                  io: str = "buffered") -> DiskFile:
    path = os.path.join(folder, f"{prefix}-{uuid.uuid4().hex[:12]}.bin")
    np.memmap(path, dtype=storage_np_dtype(dtype), mode="w+", shape=tuple(shape)).flush()
    return DiskFile(path, tuple(shape), dtype, io=io)


def mount_of(folder: str) -> tuple[str, str]:
    """(filesystem type, source) of the mount that holds `folder` (Linux; else ("", ""))."""
    path, best = os.path.realpath(folder), ("", "", "")
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return "", ""
    for line in lines:
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        fstype, source = (right.split() + ["", ""])[:2]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype, source)
    return best[1], best[2]


def accepts_direct(folder: str) -> bool:
    """Whether an aligned O_DIRECT write and read of one block succeed in `folder`."""
    if not hasattr(os, "O_DIRECT"):
        return False
    fd_tmp, path = tempfile.mkstemp(prefix=".direct-probe-", dir=folder)
    os.close(fd_tmp)
    try:
        block = aligned_empty((DIRECT_ALIGN,), torch.uint8, pin=False).fill_(7)
        view = memoryview(block.numpy())
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            ok = os.pwritev(fd, [view], 0) == DIRECT_ALIGN
            block.zero_()
            ok = ok and os.preadv(fd, [view], 0) == DIRECT_ALIGN and int(block[0]) == 7
        finally:
            os.close(fd)
        return bool(ok)
    except OSError:
        return False
    finally:
        os.remove(path)


def available_memory() -> int:
    """Bytes of memory available without swapping (Linux MemAvailable: free memory and the
    reclaimable page cache); 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def resolve_io_mode(folder: str, requested: str) -> tuple[str, str]:
    """(mode, why) for the disk tier in `folder`: "auto" is direct where the folder lies on a
    block device whose filesystem accepts O_DIRECT (the device then maps the files that fit in
    the page cache), else mmap."""
    if requested != "auto":
        return requested, "asked for"
    fstype, source = mount_of(folder)
    if fstype in _NOT_A_DRIVE or not source.startswith("/dev/"):
        return "mmap", f"auto: {fstype or 'unknown'} filesystem on {source or 'unknown'} is not a drive"
    if not accepts_direct(folder):
        return "mmap", f"auto: {fstype} on {source} refuses O_DIRECT"
    return "direct", (f"auto: {fstype} on {source} accepts O_DIRECT; files mapped while they fit "
                      f"in {PAGE_CACHE_SHARE:.0%} of the available memory")
