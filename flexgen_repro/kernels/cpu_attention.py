"""Multithreaded CPU decode attention (`cpu_attention.c`), built at first use and called via ctypes.

The C kernel reads each (row, head)'s K and V blocks once in their own dtype (float16, bfloat16
or float32), widens them in registers and accumulates in float32, on an OpenMP team of its own;
ctypes releases the GIL for the call. It reads only the written positions (`n_prev`) and skips
masked ones. Torch's CPU path instead runs two batched matmuls with float16 intermediates and a
full-length mask.

The shared library is compiled once per source, compiler flags and CPU model into
the folder envs.kernel_cache() names, written to a temporary name and renamed, so
concurrent first uses never see a half-written file. Without a C compiler, `library()` is None and
callers use the torch path; so do they where RuntimeOptions.cpu_attention_kernel is off (they pass
`enabled=False` to `supports`). RuntimeOptions.cpu_attention_threads sets the team size
(`threads`; default: see `n_threads`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from flexgen_repro import envs

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cpu_model() -> str:
    """The CPU's model and instruction-set flags (-march=native builds differ by both: a VM may
    hide AVX-512 of the same model), or the platform's processor name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    model = next((ln for ln in lines if ln.startswith("model name")), "")
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    return model + flags or platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (no compiler, or the build failed: then a warning)."""
    compiler = envs.c_compiler() or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("no C compiler (cc/gcc) found: CPU attention uses the slower torch path; "
                      "install gcc to build kernels/cpu_attention.c", RuntimeWarning, stacklevel=2)
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS, _cpu_model())).encode())
    cache = Path(envs.kernel_cache())
    target = cache / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            _build(compiler, target)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(f"building {SOURCE.name} failed, CPU attention uses the torch path:\n{detail}",
                          RuntimeWarning, stacklevel=2)
            return None
    lib = ctypes.CDLL(str(target))
    lib.fg_decode_attention.restype = ctypes.c_int
    return lib


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enabled: bool = True) -> bool:
    """CPU tensors of one supported dtype, cache blocks with a contiguous last dim, and the kernel
    `enabled` (RuntimeOptions.cpu_attention_kernel) and built."""
    return (enabled and q.device.type == "cpu" and k.device.type == "cpu" and v.device.type == "cpu"
            and q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and k.dim() == 4 and k.stride(-1) == 1 and v.stride(-1) == 1 and library() is not None)


# Cores left to the threads that run beside CPU attention (the main thread and the weight and
# cache copy threads, which spin while they wait on the GPU); docs/tuning.md has the measurement.
RESERVED_CORES = 4


@functools.cache
def _cores() -> int:
    """The machine's logical cores, read once (the kernel asks at every call)."""
    return os.cpu_count() or 1


def n_threads(given: int | None = None) -> int:
    """`given`, else torch's thread count less RESERVED_CORES (on >= 8 cores)."""
    cores = _cores()
    return given or max(1, min(torch.get_num_threads(), cores - (RESERVED_CORES if cores >= 8 else 0)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                     n_prev: int | None = None, out: torch.Tensor | None = None,
                     threads: int | None = None) -> torch.Tensor:
    """attention_math.decode_attention at sparsity 1, in the C kernel. q: (b, heads, 1, d)
    pre-scaled; k, v: (b, kv_heads, L, d), of which the first n_prev (default L) positions are read
    (kv_heads divides heads: query head h reads KV head h // (heads / kv_heads));
    mask (b, L_total) bool with the new token last when k_new is given. Returns (b, 1, heads * d),
    written into `out` when given (contiguous, q's dtype, on the host). `threads`: the team size
    (None: n_threads())."""
    b, kv_heads, length, d = k.shape
    heads = q.shape[1]
    n_prev = length if n_prev is None else n_prev
    news_ok = (k_new is None and v_new is None) or (
        k_new is not None and v_new is not None and k_new.shape == v_new.shape == (b, kv_heads, 1, d)
        and k_new.dtype == v_new.dtype == q.dtype)
    if (not 0 <= n_prev <= length or v.shape != k.shape or q.shape != (b, heads, 1, d) or not news_ok
            or heads % kv_heads):
        news = [None if t is None else tuple(t.shape) for t in (k_new, v_new)]
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"n_prev {n_prev}, k_new/v_new {news} do not match (the kernel reads raw "
                         f"memory: a mismatch would read past it)")
    mask = mask.to(torch.bool).contiguous()
    need = n_prev + (k_new is not None)
    if mask.shape[0] != b or mask.shape[1] < need:
        raise ValueError(f"mask {tuple(mask.shape)} must be ({b}, >= {need})")
    q = q.contiguous()
    new = [t.contiguous() if t is not None else None for t in (k_new, v_new)]
    new_mask = mask[:, -1].contiguous() if k_new is not None else None
    if out is None:
        out = torch.empty(b, 1, heads * d, dtype=q.dtype)
    elif (tuple(out.shape) != (b, 1, heads * d) or out.dtype != q.dtype or out.device.type != "cpu"
          or not out.is_contiguous()):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} must be a contiguous "
                         f"({b}, 1, {heads * d}) {q.dtype} tensor on the host")
    ks = (ctypes.c_long * 3)(*k.stride()[:3])
    vs = (ctypes.c_long * 3)(*v.stride()[:3])
    ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = library().fg_decode_attention(
        ctypes.c_int(DTYPES[q.dtype]), ctypes.c_long(b), ctypes.c_long(heads),
        ctypes.c_long(heads // kv_heads), ctypes.c_int(d),
        ctypes.c_long(n_prev), ptr(q), ptr(k), ptr(v), ks, vs, ptr(mask), ctypes.c_long(mask.stride(0)),
        ptr(new[0]), ptr(new[1]), ptr(new_mask), ptr(out), ctypes.c_int(n_threads(threads)))
    if rc != 0:
        raise MemoryError("cpu_attention: the kernel could not allocate its score buffers")
    return out
