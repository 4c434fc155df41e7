"""The three-tier execution environment: GPU, CPU and disk devices, the mixed (row-split) device,
and the copy channels (one background thread, and one CUDA stream where CUDA exists, per kind of
transfer) that overlap weight loads, cache loads and cache stores with compute.

On a machine without CUDA the GPU tier is backed by host memory, so every policy runs anywhere.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from flexgen_repro import trace
from flexgen_repro.devices.storage import (DiskFile, PackedStore, PlainStore, RowSplit, Segment,
                                           Stored, new_disk_file, wait_done)
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.policy import Tier, split_rows


class MemDevice:
    """GPU or CPU memory. CPU tensors are pinned (when asked) only where CUDA exists.

    Large pinned buffers are ordinary allocations registered with CUDA (cudaHostRegister) rather
    than torch's pinned allocator, which rounds every block up to a power of two (+25% host memory
    for OPT's weight shapes); `release` or `close` unregisters them.
    """

    REGISTER_MIN_BYTES = 8 << 20

    def __init__(self, tier: Tier, device: torch.device, can_pin: bool):
        self.tier, self.dev, self.can_pin = tier, device, can_pin
        self._registered: dict[int, int] = {}  # data_ptr -> bytes
        self._lock = threading.Lock()
        # FLEXGEN_PIN=alloc: torch's pinned allocator for everything (the comparison baseline)
        self.register_pinned = os.environ.get("FLEXGEN_PIN", "register") != "alloc"

    def alloc(self, shape, dtype: torch.dtype, pin: bool = False,
              long_lived: bool = True) -> torch.Tensor:
        """`long_lived` pinned buffers are registered (exact size); short-lived ones come from
        torch's pinned allocator, which reuses its blocks."""
        pin = pin and self.can_pin and self.dev.type == "cpu"
        if not pin:
            return torch.empty(tuple(shape), dtype=dtype, device=self.dev)
        if long_lived and self.register_pinned:
            t = torch.empty(tuple(shape), dtype=dtype)
            nbytes = t.numel() * t.element_size()
            if nbytes >= self.REGISTER_MIN_BYTES and self._register(t.data_ptr(), nbytes):
                return t
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)

    def _register(self, ptr: int, nbytes: int) -> bool:
        if int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)) != 0:
            return False  # e.g. an overlapping range still registered: use the pinned allocator
        with self._lock:
            self._registered[ptr] = nbytes
        return True

    def release(self, t: torch.Tensor) -> None:
        """Unregister a buffer this device registered (before its memory is freed)."""
        with self._lock:
            registered = self._registered.pop(t.data_ptr(), None)
        if registered is not None:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())

    def close(self) -> None:
        with self._lock:
            ptrs, self._registered = list(self._registered), {}
        for ptr in ptrs:
            torch.cuda.cudart().cudaHostUnregister(ptr)

    def put(self, t: torch.Tensor, pin: bool = False) -> Stored:
        buf = self.alloc(t.shape, t.dtype, pin)
        buf.copy_(t)
        return Stored(self.tier, buf)


class DiskDevice:
    """Tensors as files in the offload folder; files it wrote are removed on close."""

    tier = Tier.DISK

    def __init__(self, folder: str):
        self.folder = folder
        self._owned: list[str] = []
        self._lock = threading.Lock()

    def alloc(self, shape, dtype: torch.dtype, pin: bool = False, long_lived: bool = True) -> DiskFile:
        os.makedirs(self.folder, exist_ok=True)
        f = new_disk_file(self.folder, shape, dtype)
        with self._lock:
            self._owned.append(f.path)
        return f

    def put(self, t: torch.Tensor, pin: bool = False) -> Stored:
        f = self.alloc(t.shape, t.dtype)
        f.write(Ellipsis, t)
        return Stored(Tier.DISK, f)

    def free(self, f: DiskFile) -> None:
        """Remove one file this device wrote."""
        with self._lock:
            if f.path in self._owned:
                self._owned.remove(f.path)
        if os.path.exists(f.path):
            os.remove(f.path)

    def close(self) -> None:
        with self._lock:
            owned, self._owned = self._owned, []
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
                store = PlainStore(buf, seq_dim)
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

    @staticmethod
    def _packed_store(device, shape, dtype, config, pin, seq_dim) -> PackedStore:
        from flexgen_repro.compression import compress
        probe_shape = list(shape)
        probe_shape[0] = probe_shape[seq_dim] = 1
        probe = compress(torch.zeros(probe_shape, dtype=torch.float32), config)
        stores = {}
        for name, comp in probe.components().items():
            comp_shape = list(comp.shape)
            comp_shape[0], comp_shape[seq_dim] = shape[0], shape[seq_dim]
            comp_dtype = comp.dtype if comp.dtype == torch.uint8 else dtype
            stores[name] = PlainStore(device.alloc(comp_shape, comp_dtype, pin), seq_dim)
        return PackedStore(stores, (tuple(shape), dtype, config), seq_dim)


# Pipelined jobs (`Channel.submit(..., pipelined=True)`): the copy thread queues a job's copies
# and moves on to the next job while they are in flight; a waiter thread resolves the jobs'
# futures in order as their copies finish. Without it the thread waits for each job's copies
# before queueing the next one's, and the link idles for that hand-over (a poll, a GIL switch
# and the Python that queues the next copies) once per layer. FLEXGEN_PIPELINED_COPIES=0: off.
PIPELINED_COPIES = os.environ.get("FLEXGEN_PIPELINED_COPIES", "1") != "0"


class Channel:
    """One background copy thread (and CUDA stream): jobs run in order; errors reach the caller.

    `submit` returns a Future; `result()` re-raises a failed job's exception in the caller, so a
    failing copy never hangs the run. Without overlap, jobs run inline in the caller. A pipelined
    job's future resolves once the copies it queued are done (its result is ready to use on any
    stream), while the thread has already gone on to the next job.
    """

    def __init__(self, name: str, use_cuda: bool, inline: bool):
        self.name, self.inline = name, inline
        self.stream = torch.cuda.Stream() if use_cuda and not inline else None
        self._pool = None if inline else ThreadPoolExecutor(1, thread_name_prefix=f"copy-{name}")
        self._waiter = None
        if self.stream is not None and PIPELINED_COPIES:
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix=f"done-{name}")

    def submit(self, fn, *args, pipelined: bool = False) -> Future:
        if self.inline:
            fut: Future = Future()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # surfaced by result(), like a threaded job
                fut.set_exception(e)
            return fut
        ready = None
        if self.stream is not None:  # the job must see what compute has produced so far
            ready = torch.cuda.Event()
            ready.record()
        if pipelined and self._waiter is not None:
            outer: Future = Future()
            self._pool.submit(self._issue, fn, args, ready, outer)
            return outer
        return self._pool.submit(self._run, fn, args, ready)

    def _run(self, fn, args, ready):
        with trace.span(self.name):
            if self.stream is None:
                return fn(*args)
            with torch.cuda.stream(self.stream):
                if ready is not None:
                    self.stream.wait_event(ready)
                out = fn(*args)
            wait_done(self.stream)
            return out

    def _issue(self, fn, args, ready, outer: Future) -> None:
        """A pipelined job on the copy thread: queue its copies, hand their end to the waiter."""
        try:
            with trace.span(self.name + "/issue"), torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                out = fn(*args)
                done = torch.cuda.Event()
                done.record(self.stream)
        except BaseException as e:
            outer.set_exception(e)
            return
        self._waiter.submit(self._complete, done, out, outer)

    def _complete(self, done, out, outer: Future) -> None:
        try:
            with trace.span(self.name):
                wait_done(done)
        except BaseException as e:
            outer.set_exception(e)
            return
        outer.set_result(out)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._waiter is not None:  # after the copy thread: it hands jobs to the waiter
            self._waiter.shutdown(wait=True)
            self._waiter = None


class ExecutionEnv:
    """The GPU, CPU, disk and mixed devices plus the copy channels. A context manager."""

    CHANNELS = ("weight", "weight_disk", "cache_load", "cache_store")

    def __init__(self, gpu: MemDevice, cpu: MemDevice, disk: DiskDevice, own_dir: str | None,
                 options: RuntimeOptions | None = None):
        self.gpu, self.cpu, self.disk = gpu, cpu, disk
        self.options = options if options is not None else RuntimeOptions()  # how runs here run
        self.mixed = MixedDevice(self)
        self._own_dir = own_dir
        self._channels: dict[str, Channel] = {}
        # Compute runs on a stream of its own, not CUDA's legacy default stream: work on the
        # default stream waits for everything queued on torch's (blocking) pool streams, so a
        # small copy or kernel there would wait for the weight stream's whole queue (measured:
        # scripts/device/stream_probe.py).
        self.compute_stream = torch.cuda.Stream(gpu.dev) if gpu.dev.type == "cuda" else None

    @classmethod
    def create(cls, offload_dir: str | None = None, gpu_device: str | None = None,
               options: RuntimeOptions | None = None) -> "ExecutionEnv":
        """Make the tiers. `offload_dir` None: a temporary folder (removed on close). `options`:
        the runtime settings of runs in this env (None: RuntimeOptions())."""
        cuda = torch.cuda.is_available() and gpu_device != "cpu"
        gdev = torch.device(gpu_device or "cuda:0") if cuda else torch.device("cpu")
        own_dir = None
        if offload_dir is None:
            offload_dir = own_dir = tempfile.mkdtemp(prefix="flexgen_offload_")
        offload_dir = os.path.abspath(os.path.expanduser(offload_dir))
        return cls(MemDevice(Tier.GPU, gdev, False), MemDevice(Tier.CPU, torch.device("cpu"), cuda),
                   DiskDevice(offload_dir), own_dir, options)

    def computing(self):
        """Context in which the driver queues its GPU work (the compute stream)."""
        return torch.cuda.stream(self.compute_stream) if self.compute_stream is not None \
            else contextlib.nullcontext()

    @property
    def has_cuda(self) -> bool:
        return self.gpu.dev.type == "cuda"

    def device(self, tier: Tier):
        return {Tier.GPU: self.gpu, Tier.CPU: self.cpu, Tier.DISK: self.disk}[Tier(tier)]

    def channel(self, name: str, overlap: bool = True) -> Channel:
        """The copy channel `name`; a new set is made when `overlap` changes."""
        key = f"{name}:{overlap}"
        if key not in self._channels:
            self._channels[key] = Channel(name, self.has_cuda, inline=not overlap)
        return self._channels[key]

    def close_copy_threads(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def close(self) -> None:
        """Join the copy threads and remove every file the disk tier wrote."""
        self.close_copy_threads()
        self.cpu.close()
        self.disk.close()
        if self._own_dir and os.path.isdir(self._own_dir):
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> "ExecutionEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
