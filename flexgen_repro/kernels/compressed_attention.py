"""Triton decode attention over a 4-bit compressed KV cache: one query per head against K and V
stored as (b, s, heads * head_dim) grouped along the hidden dim (the cache layout of
flexgen_repro.compression with group_dim 2). One program per (batch row, head) streams that head's
packed bytes once, dequantizing in registers, with an online softmax in float32. Imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexgen_repro import compression as comp
from flexgen_repro.compression import CompressedTensor

BLOCK_S = 32  # positions per loop step; with NUM_WARPS = 8 ptxas (sm_90) reports no spills
NUM_WARPS = 8


def supports(q: torch.Tensor, packed_k: CompressedTensor, packed_v: CompressedTensor) -> bool:
    """4 bits, groups of 2P values that tile each head exactly, a power-of-two head's worth of bytes."""
    c = packed_k.config
    p = comp.bytes_per_group(c)
    head_dim = q.shape[-1]
    hp = head_dim // 2
    return (c == packed_v.config and c.num_bits == 4 and packed_k.group_dim == 2
            and 2 * p == c.group_size and head_dim % c.group_size == 0
            and hp >= 16 and hp & (hp - 1) == 0
            and packed_k.dtype == packed_v.dtype and packed_k.dtype in (torch.float16, torch.bfloat16, torch.float32))


@triton.jit
def _load_head(data, scale, mn, b, s, s_ok, h, c, gi, sdb, sds, ssb, sss,
               P: tl.constexpr, G: tl.constexpr, ZERO: tl.constexpr):
    """Dequantized (BLOCK_S, G*P) low and high halves of one head's K or V rows at positions s."""
    ok = s_ok[:, None]
    byte = tl.load(data + b * sdb + s[:, None] * sds + (h * G * P + c)[None, :], mask=ok, other=0)
    soff = b * ssb + s[:, None] * sss + (h * G + gi)[None, :]
    sc = tl.load(scale + soff, mask=ok, other=0).to(tl.float32)
    off = tl.load(mn + soff, mask=ok, other=0).to(tl.float32)
    lo = ((byte & 15).to(tl.float32) - ZERO) * sc + off
    hi = ((byte >> 4).to(tl.float32) - ZERO) * sc + off
    return lo, hi


@triton.jit
def _decode_attn_kernel(q, kd, ks, km, vd, vs, vm, mask, out, S, sm_scale,
                        sqb, sqh, skdb, skds, sksb, skss, svdb, svds, svsb, svss, smb, sms, sob, soh,
                        P: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, ZERO: tl.constexpr,
                        BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    c = tl.arange(0, G * P)  # byte of the head: group gi = c // P, low nibble = dim gi*GS + c % P
    gi = c // P
    d_lo = gi * GS + c % P
    d_hi = d_lo + P
    q_lo = tl.load(q + b * sqb + h * sqh + d_lo).to(tl.float32) * sm_scale
    q_hi = tl.load(q + b * sqb + h * sqh + d_hi).to(tl.float32) * sm_scale
    m_i = tl.full((), -1e30, tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc_lo = tl.zeros((G * P,), tl.float32)
    acc_hi = tl.zeros((G * P,), tl.float32)
    for start in range(0, S, BLOCK):
        s = start + tl.arange(0, BLOCK)
        s_ok = s < S
        valid = s_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask + b * smb + s * sms, mask=s_ok, other=0) != 0)
        k_lo, k_hi = _load_head(kd, ks, km, b, s, s_ok, h, c, gi, skdb, skds, sksb, skss, P, G, ZERO)
        scores = tl.sum(k_lo * q_lo[None, :] + k_hi * q_hi[None, :], axis=1)
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v_lo, v_hi = _load_head(vd, vs, vm, b, s, s_ok, h, c, gi, svdb, svds, svsb, svss, P, G, ZERO)
        v_lo = tl.where(valid[:, None], v_lo, 0.0)  # masked rows may hold anything, even NaN
        v_hi = tl.where(valid[:, None], v_hi, 0.0)
        acc_lo = acc_lo * alpha + tl.sum(p[:, None] * v_lo, axis=0)
        acc_hi = acc_hi * alpha + tl.sum(p[:, None] * v_hi, axis=0)
        m_i = m_new
    inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    tl.store(out + b * sob + h * soh + d_lo, (acc_lo * inv).to(out.dtype.element_ty))
    tl.store(out + b * sob + h * soh + d_hi, (acc_hi * inv).to(out.dtype.element_ty))


def _pieces(t: CompressedTensor):
    """data (b, s, n_groups*P) and scale/mn (b, s, n_groups) views whose last dim is contiguous."""
    b, s = t.shape[0], t.shape[1]
    data, scale, mn = t.data, t.scale, t.mn
    if data.stride(3) != 1 or data.stride(2) != data.shape[3]:
        data = data.contiguous()
    if scale.stride() != mn.stride() or scale.stride(2) != 1:
        scale, mn = scale.contiguous(), mn.contiguous()
    return data, scale, mn


def decode_attention(q: torch.Tensor, packed_k: CompressedTensor, packed_v: CompressedTensor,
                     mask: torch.Tensor | None = None, scale: float | None = None,
                     block_s: int = BLOCK_S, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Fused version of reference.decode_attention (same arguments and result)."""
    b, heads, head_dim = q.shape
    seq = packed_k.shape[1]
    c = packed_k.config
    p = comp.bytes_per_group(c)
    scale = head_dim ** -0.5 if scale is None else scale
    kd, ks, km = _pieces(packed_k)
    vd, vs, vm = _pieces(packed_v)
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty((b, heads, head_dim), dtype=q.dtype, device=q.device)
    if mask is not None:
        mask = mask.to(torch.int8)
    mptr, smb, sms = (mask, mask.stride(0), mask.stride(1)) if mask is not None else (kd, 0, 0)
    _decode_attn_kernel[(b, heads)](
        q, kd, ks, km, vd, vs, vm, mptr, out, seq, float(scale),
        q.stride(0), q.stride(1), kd.stride(0), kd.stride(1), ks.stride(0), ks.stride(1),
        vd.stride(0), vd.stride(1), vs.stride(0), vs.stride(1), smb, sms, out.stride(0), out.stride(1),
        P=p, G=head_dim // c.group_size, GS=c.group_size, ZERO=comp.zero_point(c), BLOCK=block_s,
        HAS_MASK=mask is not None, num_warps=num_warps)
    return out
