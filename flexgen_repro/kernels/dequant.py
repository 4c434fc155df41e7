"""Triton kernels for the whole-tensor quantizer: `quantize` and `dequantize` for any CompressionConfig
(the same maths and layout as flexgen_repro.compression, one pass over memory instead of a chain of
torch operations). Imports triton: load this module only where triton is installed.

Both work on the (A, n_groups, P, C) view of the packed layout (A = product of the dimensions before
the group dim, C = of those after). C == 1 (grouping along the last dim, as the KV cache does) uses a
tile of many groups; C > 1 a tile of one group times a block of C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexgen_repro import compression as comp
from flexgen_repro.compression import CompressedTensor

MAX_TILE = 8192  # elements of one program's tile; larger groups fall back to the reference
_STORED = (torch.float16, torch.bfloat16, torch.float32)


def supports(config, dtype: torch.dtype) -> bool:
    """True when these kernels handle this config and dtype (else use flexgen_repro.compression)."""
    pb = triton.next_power_of_2(comp.bytes_per_group(config))
    return dtype in _STORED and pb * 16 <= MAX_TILE


def _tile(config, c: int):
    """(PB, BLOCK_G or BLOCK_C): power-of-two tile sizes for these kernels."""
    pb = max(2, triton.next_power_of_2(comp.bytes_per_group(config)))
    other = max(1, min(MAX_TILE // pb, 128 if c > 1 else 64))
    return pb, other


@triton.jit
def _dequant_kernel(data, scale, mn, out, n_rows, n_groups, L, C,
                    P: tl.constexpr, PB: tl.constexpr, GS: tl.constexpr, K: tl.constexpr,
                    BITS: tl.constexpr, ZERO: tl.constexpr, BLOCK: tl.constexpr, LAST: tl.constexpr):
    b = tl.arange(0, PB)
    if LAST:  # tile: BLOCK groups x PB bytes; C == 1
        f = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        ok = (f < n_rows)[:, None] & (b < P)[None, :]
        byte = tl.load(data + f[:, None] * P + b[None, :], mask=ok, other=0)
        sc = tl.load(scale + f, mask=f < n_rows, other=0).to(tl.float32)[:, None]
        off = tl.load(mn + f, mask=f < n_rows, other=0).to(tl.float32)[:, None]
        base = (f // n_groups) * L + (f % n_groups) * GS
        grp = (f % n_groups)[:, None]
    else:  # tile: PB bytes x BLOCK columns of one group
        f = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (b < P)[:, None] & (c < C)[None, :]
        byte = tl.load(data + f * P * C + b[:, None] * C + c[None, :], mask=ok, other=0)
        sc = tl.load(scale + f * C + c, mask=c < C, other=0).to(tl.float32)[None, :]
        off = tl.load(mn + f * C + c, mask=c < C, other=0).to(tl.float32)[None, :]
        grp = f % n_groups
        base = (f // n_groups) * L * C + grp * GS * C
    for j in tl.static_range(K):
        code = ((byte >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        val = ((code - ZERO) * sc + off).to(out.dtype.element_ty)
        w = j * P + b
        if LAST:
            keep = ok & (w < GS)[None, :] & (grp * GS + w[None, :] < L)
            tl.store(out + base[:, None] + w[None, :], val, mask=keep)
        else:
            keep = ok & ((w < GS) & (grp * GS + w < L))[:, None]
            tl.store(out + base + w[:, None] * C + c[None, :], val, mask=keep)


def _views(packed: CompressedTensor):
    g = packed.group_dim
    a, length, c = comp._as_3d(packed.shape, g)
    n_groups = -(-length // packed.config.group_size)
    p = comp.bytes_per_group(packed.config)
    data = packed.data.reshape(a, n_groups, p, c).contiguous()
    scale = packed.scale.reshape(a, n_groups, c).contiguous()
    mn = packed.mn.reshape(a, n_groups, c).contiguous()
    return data, scale, mn, (a, length, c, n_groups, p)


def dequantize(packed: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """decompress(packed) in one kernel; `out` (packed's shape and dtype, contiguous) is optional."""
    config = packed.config
    data, scale, mn, (a, length, c, n_groups, p) = _views(packed)
    if out is None:
        out = torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)
    pb, block = _tile(config, c)
    n_rows = a * n_groups
    grid = (triton.cdiv(n_rows, block),) if c == 1 else (n_rows, triton.cdiv(c, block))
    _dequant_kernel[grid](data, scale, mn, out, n_rows, n_groups, length, c,
                          P=p, PB=pb, GS=config.group_size, K=comp.values_per_byte(config.num_bits),
                          BITS=config.num_bits, ZERO=comp.zero_point(config), BLOCK=block,
                          LAST=c == 1)
    return out


@triton.jit
def _load_part(x, base, grp, b, ok, c, L, C, j: tl.constexpr, P: tl.constexpr, GS: tl.constexpr,
               LAST: tl.constexpr):
    """Values j*P + b of the tile's groups as float32 (past L: the last value again), and which
    of them belong to a group."""
    w = j * P + b
    if LAST:
        keep = ok & (w < GS)[None, :]
        ptr = x + base - grp * GS + tl.minimum(grp * GS + w[None, :], L - 1)
    else:
        keep = ok & (w < GS)[:, None]
        ptr = x + base - grp * GS * C + tl.minimum(grp * GS + w, L - 1)[:, None] * C + c[None, :]
    return tl.load(ptr, mask=keep, other=0).to(tl.float32), keep


@triton.jit
def _step_offset(mx, mnv, stored, ZERO: tl.constexpr, TOP: tl.constexpr, SYM: tl.constexpr,
                 ROUND_UP: tl.constexpr):
    """The stored step (rounded up to `stored`) and offset of groups with this max and min."""
    if SYM:
        step = tl.math.div_rn(tl.maximum(tl.abs(mx), tl.abs(mnv)), ZERO * 1.0)
        offset = tl.where(mx == mnv, mx, 0.0)
        step = tl.where(mx == mnv, 0.0, step)
    else:
        step = tl.math.div_rn(mx - mnv, TOP * 1.0)
        offset = mnv
    step_s = step.to(stored)
    if ROUND_UP:
        bumped = (step_s.to(tl.int16, bitcast=True) + 1).to(stored, bitcast=True)
        step_s = tl.where(step_s.to(tl.float32) < step, bumped, step_s)
    return step_s, offset.to(stored)


@triton.jit
def _quant_kernel(x, data, scale, mn, n_rows, n_groups, L, C,
                  P: tl.constexpr, PB: tl.constexpr, GS: tl.constexpr, K: tl.constexpr,
                  BITS: tl.constexpr, ZERO: tl.constexpr, TOP: tl.constexpr, SYM: tl.constexpr,
                  ROUND_UP: tl.constexpr, BLOCK: tl.constexpr, LAST: tl.constexpr):
    b = tl.arange(0, PB)
    if LAST:  # tile: BLOCK groups x PB bytes; C == 1
        f = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        ok = (f < n_rows)[:, None] & (b < P)[None, :]
        grp = (f % n_groups)[:, None]
        base = (f // n_groups)[:, None] * L + grp * GS
        c = 0
    else:  # tile: PB bytes x BLOCK columns of one group
        f = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (b < P)[:, None] & (c < C)[None, :]
        grp = f % n_groups
        base = (f // n_groups) * L * C + grp * GS * C
    hi = tl.full(ok.shape, float("-inf"), tl.float32)
    lo = tl.full(ok.shape, float("inf"), tl.float32)
    for j in tl.static_range(K):  # pass 1: group max and min
        v, keep = _load_part(x, base, grp, b, ok, c, L, C, j, P, GS, LAST)
        hi = tl.maximum(hi, tl.where(keep, v, float("-inf")))
        lo = tl.minimum(lo, tl.where(keep, v, float("inf")))
    if LAST:
        mx, mnv = tl.max(hi, axis=1), tl.min(lo, axis=1)
    else:
        mx, mnv = tl.max(hi, axis=0), tl.min(lo, axis=0)
    step_s, off_s = _step_offset(mx, mnv, scale.dtype.element_ty, ZERO, TOP, SYM, ROUND_UP)
    if LAST:
        step32, off32 = step_s.to(tl.float32)[:, None], off_s.to(tl.float32)[:, None]
    else:
        step32, off32 = step_s.to(tl.float32)[None, :], off_s.to(tl.float32)[None, :]
    safe = tl.where(step32 > 0, step32, 1.0)
    packed = tl.zeros(ok.shape, tl.int32)
    for j in tl.static_range(K):  # pass 2: codes, K to a byte
        v, keep = _load_part(x, base, grp, b, ok, c, L, C, j, P, GS, LAST)
        q = tl.floor(tl.math.div_rn(v - off32, safe) + 0.5) + ZERO
        q = tl.where(step32 > 0, q, ZERO * 1.0)
        q = tl.minimum(tl.maximum(q, 0.0), TOP * 1.0).to(tl.int32)
        packed = packed | tl.where(keep, q << (j * BITS), 0)
    if LAST:
        tl.store(data + f[:, None] * P + b[None, :], packed.to(tl.uint8), mask=ok)
        tl.store(scale + f, step_s, mask=f < n_rows)
        tl.store(mn + f, off_s, mask=f < n_rows)
    else:
        tl.store(data + f * P * C + b[:, None] * C + c[None, :], packed.to(tl.uint8), mask=ok)
        tl.store(scale + f * C + c, step_s, mask=c < C)
        tl.store(mn + f * C + c, off_s, mask=c < C)


def quantize(tensor: torch.Tensor, config) -> CompressedTensor:
    """compress(tensor, config) in one kernel (same codes up to float32 rounding ties)."""
    g = comp._check(tensor, config)
    a, length, c = comp._as_3d(tuple(tensor.shape), g)
    out = CompressedTensor.empty(tuple(tensor.shape), config, tensor.dtype, tensor.device)
    data, scale, mn, (_, _, _, n_groups, p) = _views(out)  # contiguous: views of out's storage
    pb, block = _tile(config, c)
    n_rows = a * n_groups
    grid = (triton.cdiv(n_rows, block),) if c == 1 else (n_rows, triton.cdiv(c, block))
    _quant_kernel[grid](tensor.contiguous(), data, scale, mn, n_rows, n_groups, length, c,
                        P=p, PB=pb, GS=config.group_size, K=comp.values_per_byte(config.num_bits),
                        BITS=config.num_bits, ZERO=comp.zero_point(config), TOP=comp.max_code(config),
                        SYM=config.symmetric, ROUND_UP=tensor.element_size() == 2, BLOCK=block,
                        LAST=c == 1)
    return out
