"""`invoke profile-hardware`: measure this machine into a HardwareProfile and save it as JSON.

Measures host<->GPU copies (pinned and pageable, pinned in the runtime's pieces from a copy
thread, and pageable through the runtime's pinned staging blocks; the cache rate writes into a slice of a larger tensor, as a cache store does), host memory bandwidth (kept under `measurements`), disk
reads and writes with O_DIRECT in the offload folder (buffered with a warning where O_DIRECT is
refused, e.g. tmpfs) and through mappings while the page cache holds the file (the runtime's
mapped disk files), GPU memory bandwidth, fp16 matmul (prefill- and decode-shaped), attention
(prefill- and decode-shaped) on the GPU and, with fp16 data upcast to fp32 as the runtime does, on
the CPU, CPU matmul (fp32, bf16, fp16), 4-bit dequantization and, where the fused kernels run, the
rate of the fused 4-bit decode matmul (at decode batches of 1 to 256 rows), the fixed cost of a
tiny layer step (launched from Python, and replayed in a CUDA graph), and the memory of each tier.
Without CUDA the "GPU" is host memory: its fields are measured on the CPU and the profile is marked
`host_backed_gpu`. Sizes are scaled to the device (well under two minutes on an H100 machine,
seconds on a small CPU machine).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import psutil
import torch

from flexgen_repro import kernels
from flexgen_repro.cost_model.hardware import (GIB, GRAPH_STEP_OVERHEAD_S, LOCAL_PROFILE,
                                               HardwareProfile, save_profile)

GPU_HEADROOM = 0.94      # of free (or capped) GPU memory usable for tensors: allocator slack, cuBLAS
CPU_HEADROOM = 0.8  # leave room for the process itself, page cache and transient copies
DISK_HEADROOM = 0.95     # of free disk space
HOST_ONLY_GPU_SHARE = 0.75  # without a GPU: the "GPU" tier's share of the host memory both tiers use
GRAPH_LAYERS = 8         # decode layers captured in the graph that measures a step's floor


def _timed(fn, reps: int, sync) -> float:
    """Median seconds of `fn()` over `reps` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _graph_seconds(body, dev: torch.device, reps: int) -> float:
    """Median seconds of `body`'s work captured once in a CUDA graph and replayed: the kernels'
    own time, without the launches (run once first off the capturing stream, as torch asks; that
    also compiles any Triton kernel)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return _timed(graph.replay, reps, _sync(dev))


def _on_copy_thread(dst: torch.Tensor, src: torch.Tensor):
    """A function that copies src to dst as a copy channel does: copy_engine.copy_chunked_ on a
    thread and stream of its own (pieces of COPY_CHUNK_BYTES, COPY_IN_FLIGHT queued at a time),
    and waits for it."""
    from flexgen_repro.devices.copy_engine import copy_chunked_
    stream = torch.cuda.Stream(dst.device)

    def copy():
        with torch.cuda.stream(stream):
            copy_chunked_(dst, src)
        stream.synchronize()

    def run():
        with ThreadPoolExecutor(1) as pool:
            pool.submit(copy).result()
    return run


def measure_copies(dev: torch.device, nbytes: int, reps: int) -> dict:
    """Bytes per second of host->device and device->host copies, pinned and pageable, and of a
    cache store as the runtime does it (a device tensor into the sequence slice of a larger,
    pinned, head-major host buffer)."""
    sync, cuda = _sync(dev), dev.type == "cuda"
    n = nbytes // 2
    src_dev = torch.ones(n, dtype=torch.float16, device=dev)
    out = {}
    for pinned in (True, False) if cuda else (False,):
        host = torch.ones(n, dtype=torch.float16, pin_memory=pinned)
        dst_dev = torch.empty_like(src_dev)
        kind = "pinned" if pinned else "pageable"
        out[f"h2d_{kind}"] = nbytes / _timed(lambda: dst_dev.copy_(host, non_blocking=pinned), reps, sync)
        out[f"d2h_{kind}"] = nbytes / _timed(lambda: host.copy_(src_dev, non_blocking=pinned), reps, sync)
        if cuda and not pinned:  # the runtime's path for unpinned weights: pinned staging blocks
            from flexgen_repro.devices.copy_engine import CopyEngine
            copy_staged_ = CopyEngine().copy_staged_   # one engine: its staging blocks reused
            out["h2d_staged"] = nbytes / _timed(lambda: copy_staged_(dst_dev, host), reps, sync)
        if cuda and pinned:      # the runtime's pieced copies, as a copy channel makes them
            out["h2d_pieces"] = nbytes / _timed(_on_copy_thread(dst_dev, host), reps, sync)
    rows, heads, d = 8, 8, 128
    seq = max(1, n // (rows * heads * d))
    cache = torch.empty(rows, heads, seq * 2, d, dtype=torch.float16, pin_memory=cuda)
    new = src_dev[:rows * heads * seq * d].view(rows, heads, seq, d)
    from flexgen_repro.devices.storage import PlainStore  # the runtime's store: staged, scattered
    store = PlainStore(cache, seq_dim=2)
    out["d2h_cache"] = new.numel() * 2 / _timed(lambda: store.write(0, new), reps, sync)
    if not cuda:
        out["h2d_pinned"], out["d2h_pinned"] = out["h2d_pageable"], out["d2h_pageable"]
    return out


def measure_host_memory(nbytes: int, reps: int) -> dict:
    """Host memory bandwidth: a copy reads and writes every byte."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return {"cpu_mem_bytes_s": 2 * nbytes / _timed(lambda: dst.copy_(src), reps, lambda: None)}


def _direct_io(path: str, nbytes: int, chunk: int, direct: bool) -> tuple[float, float]:
    """(write, read) bytes per second of a file of `nbytes` written and read back in `chunk`s."""
    flag = os.O_DIRECT if direct else 0
    buf = mmap.mmap(-1, chunk)                      # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(4096) * (chunk // 4096))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(nbytes // chunk):
            os.write(fd, buf)
        os.fsync(fd)
        write = nbytes / (time.perf_counter() - t0)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY | flag)
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        while os.readv(fd, [buf]) > 0:
            pass
        read = nbytes / (time.perf_counter() - t0)
    finally:
        os.close(fd)
    return write, read


def measure_disk(folder: str, nbytes: int) -> dict:
    """Disk read and write bandwidth in `folder`, with O_DIRECT where the filesystem allows it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f".flexgen_repro_profile_{os.getpid()}.bin")
    chunk = 16 << 20
    nbytes = max(chunk, nbytes // chunk * chunk)
    try:
        try:
            write, read = _direct_io(path, nbytes, chunk, direct=hasattr(os, "O_DIRECT"))
            mode = "O_DIRECT" if hasattr(os, "O_DIRECT") else "buffered"
        except OSError as e:
            warnings.warn(f"O_DIRECT refused in {folder} ({e.strerror}); measuring buffered I/O "
                          "with the page cache dropped, which may overstate the drive's speed")
            write, read = _direct_io(path, nbytes, chunk, direct=False)
            mode = "buffered"
    finally:
        if os.path.exists(path):
            os.remove(path)
    return {"disk_write": write, "disk_read": read, "disk_mode": mode, "disk_test_bytes": nbytes}


def measure_page_cache(folder: str, nbytes: int, reps: int, pin: bool,
                       dev: torch.device | None = None) -> dict:
    """Bytes per second of the disk tier's mapped files while the page cache holds them, as the
    runtime moves them (disk_io.DiskFile in "mmap" mode): a whole write into a fresh file (the
    first touch of its pages, as a prefill's cache store), a whole read out of the mapping (into
    pinned memory where it goes on to the GPU), and on a CUDA `dev` the copy of the mapping,
    registered with CUDA, straight to the GPU, as a disk weight crosses (`h2d_mapped`)."""
    from flexgen_repro.devices.disk_io import new_disk_file
    os.makedirs(folder, exist_ok=True)
    f = new_disk_file(folder, (nbytes // 2,), torch.float16, prefix=".profile-page-cache", io="mmap")
    try:
        src = torch.rand(nbytes // 2, dtype=torch.float32).to(torch.float16)
        t0 = time.perf_counter()
        f.write(Ellipsis, src)
        write = nbytes / (time.perf_counter() - t0)
        read = nbytes / _timed(lambda: f.read(pin=pin), reps, lambda: None)
        out = {"page_cache_write": write, "page_cache_read": read}
        mapped = f.pinned_view() if dev is not None and dev.type == "cuda" else None
        if mapped is not None:
            dst = torch.empty(mapped.shape, dtype=mapped.dtype, device=dev)
            out["h2d_mapped"] = nbytes / _timed(lambda: dst.copy_(mapped, non_blocking=True),
                                                reps, _sync(dev))
    finally:
        f.close()
        os.remove(f.path)
    return out


def _attention(q, k, v):
    scores = q @ k.transpose(-1, -2)
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def measure_compute(dev: torch.device, big: bool, reps: int) -> dict:
    """Flop/s of fp16 matmul and attention on `dev` (fp32 on a host-backed GPU), and its memory
    bandwidth (a device-to-device copy reads and writes every byte)."""
    sync = _sync(dev)
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    h, m_pre, m_dec, heads = (8192, 4096, 512, 64) if big else (1024, 512, 64, 8)
    w = torch.randn(h, h, dtype=dt, device=dev)
    out = {}
    for name, m in (("mm_prefill", m_pre), ("mm_decode", m_dec)):
        x = torch.randn(m, h, dtype=dt, device=dev)
        out[name] = 2 * m * h * h / _timed(lambda: x @ w, reps, sync)
    b, s, hd = (8, 512, h // heads) if big else (2, 256, h // heads)
    q = torch.randn(b, heads, s, hd, dtype=dt, device=dev)
    out["bmm_prefill"] = 4 * b * s * s * h / _timed(lambda: _attention(q, q, q), reps, sync)
    b, ctx = (64, 1024) if big else (8, 512)
    q, kv = (torch.randn(b, heads, n, hd, dtype=dt, device=dev) for n in (1, ctx))
    out["bmm_decode"] = 4 * b * ctx * h / _timed(lambda: _attention(q, kv, kv), reps, sync)
    buf = torch.empty((2 << 30) if big else (128 << 20), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    out["mem_bw"] = 2 * buf.numel() / _timed(lambda: dst.copy_(buf), reps, sync)
    out["dequant"] = _dequant_rate(dev, (256 << 20) if big else (16 << 20), reps)
    return out


def _dequant_rate(dev: torch.device, n_values: int, reps: int) -> float:
    """fp16 bytes per second out of a 4-bit group-wise (64) dequantization written in torch ops."""
    sync, groups = _sync(dev), n_values // 64
    data = torch.randint(0, 255, (groups, 32), dtype=torch.uint8, device=dev)
    scale = torch.rand(groups, 1, dtype=torch.float16, device=dev)
    mn = torch.rand(groups, 1, dtype=torch.float16, device=dev)

    def run():
        codes = torch.cat([data & 15, data >> 4], dim=1).to(torch.float16)
        return codes * scale + mn
    from flexgen_repro import kernels
    if dev.type == "cuda" and kernels.available():  # what the runtime runs: the fused kernel
        from flexgen_repro.compression import CompressedTensor
        from flexgen_repro.policy import CompressionConfig
        packed = CompressedTensor(data.view(groups, 1, 32), scale.view(groups, 1, 1), mn.view(groups, 1, 1),
                                  (groups, 64), torch.float16, CompressionConfig(4, 64, 1, False))
        return 2 * n_values / _timed(lambda: kernels.dequantize(packed), reps, sync)
    return 2 * n_values / _timed(run, reps, sync)


FUSED_MATMUL_BATCHES = (1, 8, 16, 32, 48, 64, 80, 96, 128, 192, 256)
FUSED_MATMUL_BATCH = 32  # the batch of the profile's single figure, gpu_fused_matmul_bytes_s


def measure_fused_matmul(dev: torch.device, reps: int, batch: int = FUSED_MATMUL_BATCH) -> float | None:
    """Packed weight bytes per second the fused 4-bit decode matmul reads (kernels.dequant_linear,
    the runtime's decode path for compressed weights): the six matrices of one OPT-6.7B layer (q,
    k, v, out 4096x4096; fc1 16384x4096; fc2 4096x16384) in the weights' default compression, one
    token each for `batch` rows, captured once in a CUDA graph and replayed, so the figure is the
    kernels' own time (the cost model adds the launches of a step apart: gpu_step_overhead_s, or
    the graph floor where decode replays graphs). None without CUDA and Triton (the kernel does
    not run there)."""
    rates = measure_fused_matmul_batches(dev, reps, (batch,))
    return rates[0][1] if rates else None


def measure_fused_matmul_batches(dev: torch.device, reps: int,
                                 batches=FUSED_MATMUL_BATCHES) -> list:
    """[[batch, packed bytes per second], ...] of measure_fused_matmul at each batch (one set of
    weights for all; beyond kernels' DECODE_MAX_M rows the same call dequantizes and runs
    cuBLAS, as the runtime does); [] without CUDA and Triton."""
    if dev.type != "cuda" or not kernels.available():
        return []
    from flexgen_repro.policy import CompressionConfig
    config, h = CompressionConfig(4, 64, 0, False), 4096
    shapes = [(h, h)] * 4 + [(4 * h, h), (h, 4 * h)]
    weights = [kernels.quantize(torch.randn(*shape, dtype=torch.float16, device=dev) * 0.02, config)
               for shape in shapes]
    nbytes = sum(w.nbytes for w in weights)
    rates = []
    for batch in batches:
        xs = {n: torch.randn(batch, 1, n, dtype=torch.float16, device=dev) for n in (h, 4 * h)}

        def layer():
            for w in weights:
                kernels.dequant_linear(xs[w.shape[1]], w)
        rates.append([batch, nbytes / _graph_seconds(layer, dev, reps)])
    return rates


def measure_step_overhead(dev: torch.device, reps: int) -> float:
    """Seconds of one tiny (layer, GPU batch) step: the kernels of an attention or an MLP step on
    one token of a narrow layer, a copy-thread round trip and a synchronization (mean of the two)."""
    sync, dt = _sync(dev), torch.float16 if dev.type == "cuda" else torch.float32
    h, heads = 256, 4
    w, w1, w2 = (torch.randn(*shape, dtype=dt, device=dev) for shape in ((h, h), (4 * h, h), (h, 4 * h)))
    x = torch.randn(1, 1, h, dtype=dt, device=dev)
    cache = torch.randn(1, heads, 16, h // heads, dtype=dt, device=dev)
    norm = torch.nn.functional.layer_norm
    with ThreadPoolExecutor(1) as pool:
        def attention_step():
            pool.submit(lambda: None).result()
            hn = norm(x, (h,))
            q, k, v = ((hn @ w).view(1, 1, heads, -1).transpose(1, 2) for _ in range(3))
            k, v = torch.cat([cache, k], dim=2), torch.cat([cache, v], dim=2)
            return (_attention(q, k, v).transpose(1, 2).reshape(1, 1, h) @ w) + x

        def mlp_step():
            pool.submit(lambda: None).result()
            return torch.relu(norm(x, (h,)) @ w1.t()) @ w2.t() + x
        return (_timed(attention_step, reps, sync) + _timed(mlp_step, reps, sync)) / 2


def measure_graph_step_overhead(dev: torch.device, mem_bw: float, big: bool, reps: int) -> float | None:
    """Seconds of one decode (layer, GPU batch) step replayed in a CUDA graph beyond its HBM time,
    as the runtime decodes where everything is on the GPU (graph_decode.py). GRAPH_LAYERS decode
    layers of an OPT-6.7B width (batch 2; attention: layer norm, q, k, v, the new token written
    into a cache buffer, decode attention, out-projection; MLP: layer norm, fc1, ReLU, fc2), each
    with its own weights, captured once and replayed: (replay time - bytes read / mem_bw) per step,
    the floor the cost model adds to a step's HBM time. None without CUDA (no graphs there)."""
    if dev.type != "cuda":
        return None
    from flexgen_repro.model.attention_math import decode_attention, to_heads
    dt, norm, linear = torch.float16, torch.nn.functional.layer_norm, torch.nn.functional.linear
    h, heads, b, ctx = (4096, 32, 2, 544) if big else (1024, 8, 2, 128)

    def new(*shape):
        return torch.randn(*shape, dtype=dt, device=dev) * 0.02
    layers = [dict(w=[new(h, h) for _ in range(4)], fc1=new(4 * h, h), fc2=new(h, 4 * h),
                   kv=[torch.zeros(b, heads, ctx, h // heads, dtype=dt, device=dev) for _ in range(2)])
              for _ in range(GRAPH_LAYERS)]
    bias, bias4, x = new(h), new(4 * h), new(b, 1, h)
    mask, index = torch.ones(b, ctx, dtype=torch.bool, device=dev), torch.tensor([ctx - 1], device=dev)

    def body():
        y = x
        for lw in layers:
            hn = norm(y, (h,))
            q, k, v = (to_heads(linear(hn, w, bias), heads) for w in lw["w"][:3])
            lw["kv"][0].index_copy_(2, index, k)
            lw["kv"][1].index_copy_(2, index, v)
            y = linear(decode_attention(q, *lw["kv"], mask), lw["w"][3], bias) + y
            y = linear(torch.relu(linear(norm(y, (h,)), lw["fc1"], bias4)), lw["fc2"], bias) + y
        return y

    seconds = _graph_seconds(body, dev, reps)
    read = [t for lw in layers for t in (*lw["w"], lw["fc1"], lw["fc2"], *lw["kv"])]
    nbytes = sum(t.numel() * t.element_size() for t in read)
    return max(0.0, seconds - nbytes / mem_bw) / (2 * GRAPH_LAYERS)


def measure_cpu(big: bool, reps: int, dev: torch.device | None = None) -> dict:
    """CPU attention as the runtime's CPU decode runs it (layers.attend, so the C kernel where it
    builds; fp16 head-major cache, a new token; on a CUDA machine at an OPT-30B-sized
    (16 x 56 heads x 512 x 128) batch while pinned host memory streams to the GPU, as the weights
    do during the runtime's CPU attention: both read host memory) and CPU matmul per dtype."""
    from flexgen_repro.model.layers import attend
    h, heads, b, ctx = (7168, 56, 16, 512) if big else (1024, 8, 4, 256)
    q = torch.randn(b, heads, 1, h // heads, dtype=torch.float16) * (h // heads) ** -0.5  # pre-scaled
    kv = torch.randn(b, heads, ctx, h // heads, dtype=torch.float16)
    new, mask = q.clone(), torch.ones(b, ctx + 1, dtype=torch.bool)
    with _host_to_gpu_stream(dev):
        t = _timed(lambda: attend(q, kv, kv, mask, 1.0, new, new), reps, lambda: None)
    out = {"cpu_attention": 4 * b * ctx * h / t}
    for dt, n in ((torch.float32, 1024 if big else 512), (torch.bfloat16, 128), (torch.float16, 128)):
        a = torch.randn(n, n, dtype=dt)
        out[f"cpu_mm_{str(dt).split('.')[-1]}"] = 2 * n ** 3 / _timed(lambda: a @ a, 2, lambda: None)
    return out


def host_usable() -> float:
    """Bytes of host memory usable for tensors: what is available, after CPU_HEADROOM."""
    return psutil.virtual_memory().available * CPU_HEADROOM


def host_only_tiers() -> tuple[float, float]:
    """(GPU tier, CPU tier) usable bytes on a machine without a GPU. Both tiers are its host
    memory, so they share host_usable(), counted once, not once per tier; the "GPU" tier takes
    HOST_ONLY_GPU_SHARE (what it holds is computed on where it is)."""
    usable = host_usable()
    return usable * HOST_ONLY_GPU_SHARE, usable * (1 - HOST_ONLY_GPU_SHARE)


def measure_memory(offload_dir: str, gpu_mem_gb: float | None) -> dict:
    """Usable bytes of each tier (after the headrooms above)."""
    disk = shutil.disk_usage(offload_dir).free * DISK_HEADROOM
    if torch.cuda.is_available():
        cpu = host_usable()
        free, total = torch.cuda.mem_get_info()
        gpu = min(free, gpu_mem_gb * GIB) if gpu_mem_gb else free
        gpu *= GPU_HEADROOM
    else:
        (gpu, cpu), total = host_only_tiers(), psutil.virtual_memory().total
    return {"gpu_mem": gpu, "cpu_mem": cpu, "disk_mem": disk, "gpu_total": total}


STREAM_PIECE = 64 << 20


@contextlib.contextmanager
def _host_to_gpu_stream(dev: torch.device | None, nbytes: int = 1 << 30):
    """While inside, a thread copies a pinned host buffer to `dev` over and over (nothing on a
    machine without CUDA)."""
    if dev is None or dev.type != "cuda":
        yield
        return
    stop = threading.Event()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)

    started = threading.Event()

    def stream():
        with torch.cuda.stream(torch.cuda.Stream(dev)):
            while not stop.is_set():
                for i in range(0, nbytes, STREAM_PIECE):  # pieces, as the runtime copies
                    dst[i:i + STREAM_PIECE].copy_(host[i:i + STREAM_PIECE], non_blocking=True)
                torch.cuda.current_stream(dev).synchronize()
                started.set()
    th = threading.Thread(target=stream, daemon=True)
    th.start()
    try:
        started.wait(30)  # measure only once the link is streaming
        yield
    finally:
        stop.set()
        th.join()


def measure(offload_dir: str, gpu_mem_gb: float | None = None) -> HardwareProfile:
    """Measure this machine (see the module docstring)."""
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    offload_dir = os.path.expanduser(offload_dir)
    os.makedirs(offload_dir, exist_ok=True)
    m = measure_memory(offload_dir, gpu_mem_gb)
    m.update(measure_copies(dev, (1 << 30) if cuda else (64 << 20), 5 if cuda else 3))
    m.update(measure_host_memory((1 << 30) if cuda else (128 << 20), 5 if cuda else 3))
    m.update(measure_disk(offload_dir, min((2 << 30) if cuda else (128 << 20), int(m["disk_mem"] / 4))))
    m.update(measure_page_cache(offload_dir, min((1 << 30) if cuda else (64 << 20), int(m["disk_mem"] / 4)),
                                5 if cuda else 3, pin=cuda, dev=dev))
    m.update(measure_compute(dev, cuda, 10 if cuda else 3))
    m.update(measure_cpu(cuda, 20 if cuda else 3, dev))
    m["step_overhead"] = measure_step_overhead(dev, 50)
    m["graph_step_overhead"] = measure_graph_step_overhead(dev, m["mem_bw"], cuda, 20)
    m["fused_matmul_batches"] = measure_fused_matmul_batches(dev, 20)
    m["fused_matmul"] = dict(m["fused_matmul_batches"]).get(FUSED_MATMUL_BATCH)
    cpu_name = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(dev) if cuda else f"host-backed ({cpu_name})"
    m.update(device=name, torch=torch.__version__, host=platform.node(), seconds=time.perf_counter() - start,
             gpu_mem_cap_gb=gpu_mem_gb)
    return HardwareProfile(
        name="local", gpu_mem_bytes=m["gpu_mem"], cpu_mem_bytes=m["cpu_mem"], disk_mem_bytes=m["disk_mem"],
        cpu_to_gpu_bytes_s=m["h2d_pinned"], cpu_to_gpu_pageable_bytes_s=m["h2d_pageable"],
        gpu_to_cpu_cache_bytes_s=m["d2h_cache"], gpu_to_cpu_hidden_bytes_s=m["d2h_pinned"],
        disk_to_cpu_bytes_s=m["disk_read"], cpu_to_disk_cache_bytes_s=m["disk_write"],
        cpu_to_disk_bytes_s=m["disk_write"], gpu_mem_bw_bytes_s=m["mem_bw"],
        page_cache_read_bytes_s=m["page_cache_read"], page_cache_write_bytes_s=m["page_cache_write"],
        gpu_fused_matmul_bytes_s=m["fused_matmul"] or 0.0,
        gpu_fused_matmul_batches=m["fused_matmul_batches"],
        gpu_mm_prefill_flop_s=m["mm_prefill"], gpu_mm_decode_flop_s=m["mm_decode"],
        gpu_bmm_prefill_flop_s=m["bmm_prefill"], gpu_bmm_decode_flop_s=m["bmm_decode"],
        cpu_attention_flop_s=m["cpu_attention"], gpu_dequant_bytes_s=m["dequant"],
        gpu_step_overhead_s=m["step_overhead"], gpu_headroom=GPU_HEADROOM if cuda else 1.0,
        gpu_graph_step_overhead_s=m["graph_step_overhead"] or GRAPH_STEP_OVERHEAD_S,
        cpu_mm_flop_s=m["cpu_mm_float32"], host_backed_gpu=not cuda,
        gpu_fused_kernels=cuda and kernels.available(),
        description=f"measured on {name} ({m['host']}) in {m['seconds']:.0f} s",
        sources={"all": f"flexgen_repro.cost_model.profile, disk I/O {m['disk_mode']} in {offload_dir}"},
        measurements=m)


def format_table(profile: HardwareProfile) -> str:
    """The profile as an aligned two-column table (GiB, GiB/s, TFLOP/s)."""
    rows = []
    for key, value in profile.to_json().items():
        if key.endswith("_bytes"):
            rows.append((key, f"{value / GIB:10.2f} GiB"))
        elif key.endswith("_bytes_s"):
            rows.append((key, f"{value / GIB:10.3f} GiB/s"))
        elif key.endswith("_flop_s"):
            rows.append((key, f"{value / 1e12:10.4f} TFLOP/s"))
        elif key in ("gpu_step_overhead_s", "gpu_graph_step_overhead_s"):
            rows.append((key, f"{value * 1e6:10.1f} us"))
        elif key in ("name", "host_backed_gpu", "description"):
            rows.append((key, str(value)))
        elif key == "gpu_fused_matmul_batches" and value:
            rows.append((key, " ".join(f"{b}:{r / GIB:.0f}" for b, r in value) + " (batch:GiB/s)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(offload_dir: str = "~/flexllmgen_offload_dir", out: str | None = None,
         gpu_mem_gb: float | None = None) -> int:
    """Measure, print the table, save the JSON (default ~/.cache/flexgen_repro/hardware_local.json)."""
    try:
        profile = measure(offload_dir, gpu_mem_gb)
    except OSError as e:
        print(f"error: could not measure in {offload_dir}: {e}; pass --offload-dir on a writable drive",
              file=sys.stderr)
        return 2
    path = save_profile(profile, out or LOCAL_PROFILE)
    print(format_table(profile))
    print(f"saved {path} (use it with --hardware local or --hardware {path})")
    return 0


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m flexgen_repro.cost_model.profile", description=__doc__)
    p.add_argument("--offload-dir", default="~/flexllmgen_offload_dir")
    p.add_argument("--out", default=None)
    p.add_argument("--gpu-mem-gb", type=float, default=None, help="cap the GPU memory (GiB), e.g. 16")
    a = p.parse_args()
    sys.exit(main(a.offload_dir, a.out, a.gpu_mem_gb))
