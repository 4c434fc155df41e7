"""Triton dequantize-then-matmul for compressed Linear weights: y = x @ dequant(W).T + bias.

W is (out, in), 4-bit, compressed along out (group_dim 0, FlexGen's weight default) or along in
(group_dim 1). Decode (x has at most DECODE_MAX_M rows) runs one fused, memory-bound kernel that
reads every packed byte once per block of rows of x and splits the in-dimension over programs
(split-K) so that a small layer still fills the GPU; each split stores its float32 partial sums
and one reduction adds them in a fixed order, so a result repeats bit for bit (atomic adds would
add them in whatever order the programs finish). Larger x (prefill) dequantizes
W into a scratch buffer with one kernel and calls torch's matmul. Imports triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flexgen_repro import compression as comp
from flexgen_repro.compression import CompressedTensor
from flexgen_repro.kernels import dequant

DECODE_MAX_M = 128  # rows of x up to which the fused kernel runs; beyond, dequantize + cuBLAS
PROGRAMS_PER_SM = 2  # split-K target: at least this many programs per multiprocessor
_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports_fused(x: torch.Tensor, packed_w: CompressedTensor) -> bool:
    """Whether the fused decode kernel handles this weight (4 bits, P a power of two >= 16)."""
    c = packed_w.config
    p = comp.bytes_per_group(c)
    return (c.num_bits == 4 and len(packed_w.shape) == 2 and packed_w.group_dim in (0, 1)
            and p >= 16 and p & (p - 1) == 0 and 2 * p == c.group_size
            and x.dtype in _DOT_DTYPES and packed_w.dtype in _DOT_DTYPES)


@triton.jit
def _rows_kernel(x, data, scale, mn, bias, y, M, N, K, n_groups, k_per_split,
                 stride_xm, stride_ym,
                 P: tl.constexpr, GS: tl.constexpr, ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PREC: tl.constexpr):
    """W grouped along out: packed row r = group * P + b holds out rows group*GS + b (low nibble)
    and group*GS + P + b (high nibble) for every input column."""
    pid_r, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    grp = r // P
    n_lo = grp * GS + r % P
    n_hi = n_lo + P
    r_ok = grp < n_groups
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    acc_lo = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    k_start = pid_k * k_per_split  # splits are whole BLOCK_Ks; the last one runs past K, masked
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        w_ok = r_ok[:, None] & k_ok[None, :]
        byte = tl.load(data + r[:, None].to(tl.int64) * K + k[None, :], mask=w_ok, other=0)
        if BLOCK_R == P:  # one group: its scale and offset are a row vector
            g1 = pid_r.to(tl.int64) * K
            sc = tl.load(scale + g1 + k, mask=k_ok, other=0).to(tl.float32)[None, :]
            off = tl.load(mn + g1 + k, mask=k_ok, other=0).to(tl.float32)[None, :]
        else:
            sc = tl.load(scale + grp[:, None].to(tl.int64) * K + k[None, :], mask=w_ok, other=0).to(tl.float32)
            off = tl.load(mn + grp[:, None].to(tl.int64) * K + k[None, :], mask=w_ok, other=0).to(tl.float32)
        w_lo = (((byte & 15).to(tl.float32) - ZERO) * sc + off).to(xt.dtype)
        w_hi = (((byte >> 4).to(tl.float32) - ZERO) * sc + off).to(xt.dtype)
        acc_lo = tl.dot(xt, tl.trans(w_lo), acc_lo, input_precision=PREC)
        acc_hi = tl.dot(xt, tl.trans(w_hi), acc_hi, input_precision=PREC)
    _finish(acc_lo, bias, y, m, n_lo, M, N, stride_ym, pid_k, HAS_BIAS)
    _finish(acc_hi, bias, y, m, n_hi, M, N, stride_ym, pid_k, HAS_BIAS)


@triton.jit
def _cols_kernel(x, data, scale, mn, bias, y, M, N, K, n_groups, groups_per_split,
                 stride_xm, stride_ym,
                 P: tl.constexpr, GS: tl.constexpr, ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """W grouped along in: packed byte (n, group * P + b) holds W[n, group*GS + b] (low nibble)
    and W[n, group*GS + P + b] (high nibble)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    b = tl.arange(0, P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    g_start = pid_k * groups_per_split  # the last split runs past n_groups, masked
    for g in range(g_start, g_start + groups_per_split):
        w_ok = n_ok & (g < n_groups)
        byte = tl.load(data + n[:, None].to(tl.int64) * (n_groups * P) + g * P + b[None, :],
                       mask=w_ok[:, None], other=0)
        sc = tl.load(scale + n.to(tl.int64) * n_groups + g, mask=w_ok, other=0).to(tl.float32)[:, None]
        off = tl.load(mn + n.to(tl.int64) * n_groups + g, mask=w_ok, other=0).to(tl.float32)[:, None]
        k_lo = g * GS + b
        k_hi = k_lo + P
        x_lo = tl.load(x + m[:, None] * stride_xm + k_lo[None, :], mask=m_ok[:, None] & (k_lo < K)[None, :], other=0)
        x_hi = tl.load(x + m[:, None] * stride_xm + k_hi[None, :], mask=m_ok[:, None] & (k_hi < K)[None, :], other=0)
        w_lo = (((byte & 15).to(tl.float32) - ZERO) * sc + off).to(x_lo.dtype)
        w_hi = (((byte >> 4).to(tl.float32) - ZERO) * sc + off).to(x_lo.dtype)
        acc = tl.dot(x_lo, tl.trans(w_lo), acc, input_precision=PREC)
        acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision=PREC)
    _finish(acc, bias, y, m, n, M, N, stride_ym, pid_k, HAS_BIAS)


@triton.jit
def _finish(acc, bias, y, m, n, M, N, stride_ym, pid_k, HAS_BIAS: tl.constexpr):
    """Add the bias (once: split 0) and write split pid_k's tile of y, which is (splits, M, N)
    (with one split, (M, N))."""
    ok = (m < M)[:, None] & (n < N)[None, :]
    if HAS_BIAS:
        bv = tl.load(bias + n, mask=(n < N) & (pid_k == 0), other=0).to(tl.float32)
        acc += bv[None, :]
    ptr = y + pid_k.to(tl.int64) * M * stride_ym + m[:, None] * stride_ym + n[None, :]
    tl.store(ptr, acc.to(y.dtype.element_ty), mask=ok)


def decode_config(m: int, out_units: int, group_dim: int, num_sms: int, p: int = 32) -> dict:
    """Block sizes and split-K for the fused kernel. out_units: packed rows (group_dim 0) or output
    columns (group_dim 1). Rows of x per program: 16 up to 16 rows; up to 32, 64 for weights
    grouped along out (the default) and 32 along in; then 64 up to 64, else 128. Along out the
    32-row tile (4 warps) issues more work per packed byte than the 64-row wgmma tile (8 warps),
    5600 against 4800 SASS instructions per program, and read 294 GB/s of packed weights at 32
    rows on an H100 where the 64-row tile reads 431 (docs/cost-model.md); along in it issues less
    (5280 against 7104; `scripts/kernel_resources.py --rows 32 --sweep`). Chosen so that ptxas
    (sm_90, Triton 3.6) reports no register spills (scripts/kernel_resources.py checks);
    `scripts/bench_kernels.py --sweep` times the alternatives on a real GPU."""
    block_m = 16 if m <= 16 else 32 if m <= 32 and group_dim == 1 else 64 if m <= 64 else 128
    block_out = p if group_dim == 0 else (32 if m <= 16 else 64)
    cfg = {"BLOCK_M": block_m, "BLOCK_OUT": block_out, "BLOCK_K": 64,
           "num_warps": 8 if block_m >= 64 else 4}
    programs = triton.cdiv(out_units, block_out) * triton.cdiv(m, block_m)
    cfg["split"] = max(1, triton.cdiv(PROGRAMS_PER_SM * num_sms, programs))
    return cfg


def _launch(x2: torch.Tensor, packed_w: CompressedTensor, bias, overrides: dict | None):
    m, k = x2.shape
    n = packed_w.shape[0]
    c = packed_w.config
    p, gd = comp.bytes_per_group(c), packed_w.group_dim
    n_groups = -(-packed_w.shape[gd] // c.group_size)
    sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
    cfg = {**decode_config(m, n_groups * p if gd == 0 else n, gd, sms, p), **(overrides or {})}
    prec = "ieee" if x2.dtype == torch.float32 else "tf32"
    common = dict(P=p, GS=c.group_size, ZERO=comp.zero_point(c), BLOCK_M=cfg["BLOCK_M"],
                  HAS_BIAS=bias is not None, PREC=prec, num_warps=cfg["num_warps"])
    data, scale, mn = (t.contiguous() for t in (packed_w.data, packed_w.scale, packed_w.mn))
    if gd == 0:  # split the in-dimension in multiples of BLOCK_K
        step = triton.cdiv(triton.cdiv(k, cfg["split"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        split = triton.cdiv(k, step)
        grid = (triton.cdiv(n_groups * p, cfg["BLOCK_OUT"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
        kernel, extra = _rows_kernel, dict(BLOCK_R=cfg["BLOCK_OUT"], BLOCK_K=cfg["BLOCK_K"])
    else:  # split the in-dimension in whole groups
        step = triton.cdiv(n_groups, min(cfg["split"], n_groups))
        split = triton.cdiv(n_groups, step)
        grid = (triton.cdiv(n, cfg["BLOCK_OUT"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
        kernel, extra = _cols_kernel, dict(BLOCK_N=cfg["BLOCK_OUT"])
    partial = split > 1
    y = torch.empty((split, m, n) if partial else (m, n), device=x2.device,
                    dtype=torch.float32 if partial else x2.dtype)
    kernel[grid](x2, data, scale, mn, bias if bias is not None else x2, y, m, n, k, n_groups, step,
                 x2.stride(0), n, **common, **extra)
    return y.sum(0).to(x2.dtype) if partial else y


def dequant_linear(x: torch.Tensor, packed_w: CompressedTensor, bias=None,
                   overrides: dict | None = None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias on the GPU: the fused kernel for decode-sized x, else dequantize
    (one kernel) then torch's matmul. x: (..., in) -> (..., out), x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] <= DECODE_MAX_M and supports_fused(x2, packed_w):
        y = _launch(x2, packed_w, bias, overrides)
    else:
        w = dequant.dequantize(packed_w) if dequant.supports(packed_w.config, packed_w.dtype) \
            else comp.decompress(packed_w)
        y = F.linear(x2, w.to(x2.dtype), None if bias is None else bias.to(x2.dtype))
    return y.reshape(*lead, packed_w.shape[0])
