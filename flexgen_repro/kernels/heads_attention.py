"""Triton decode attention over the runtime's head-major 4-bit compressed KV cache.

K and V are CompressedTensors of shape (b, heads, L, head_dim) grouped along head_dim (group_dim 3),
possibly views narrowed along L out of a longer buffer (any strides). One program per (head, row)
streams that head's packed bytes once, turning 4-bit codes into float32 in registers, with an online
softmax in float32; the new token's dense k/v may come separately (it is the last position).
Matches `reference.heads_decode_attention`, except that a position of zero weight (masked, in a
row with anything attended) adds nothing even when its stored scale or mn is not finite (say an
unwritten slot of a preallocated cache), where the reference gives NaN. Imports triton.

Maths per program, for group g of a position: x = (code - zero) * scale + mn = (code - center) *
scale + mid, with mid = mn + (center - zero) * scale the value of the middle code (center 8, or the
zero point when symmetric; centring keeps the two sums below from cancelling), so
    score = sum_g scale_g * (q_g . (codes_g - center)) + mid_g * sum(q_g)
    out   = (sum_l p_l * scale_lg * (codes_lg - center) + sum_l p_l * mid_lg) / sum_l p_l
Codes become floats without shifts or int-to-float conversions: packed bytes are read as int32
words, and a nibble masked in place and OR-ed into the bits of 2**23 reads as 2**23 + code * 2**e
(e set by the nibble's place in the word); subtracting 2**23 + center * 2**e is exact, and the
2**-e goes into q (for scores) or is applied once at the end (for V). So a code costs one LOP3, one
FADD and one FFMA. The softmax rescales its running sums only when the block maximum grows by more
than RESCALE (each weight stays below e**RESCALE), as in FlashAttention-4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexgen_repro import compression as comp
from flexgen_repro.compression import CompressedTensor

BLOCK_L = 32    # positions per loop step; ptxas (sm_90, head_dim 128): <= 127 registers, no spills
NUM_WARPS = 4
MAX_HEAD_DIM = 256  # larger heads would spill registers: left to the reference
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAGIC = 0x4B000000  # the bits of float32 2**23


def supports(q: torch.Tensor, packed_k: CompressedTensor, packed_v: CompressedTensor) -> bool:
    """4-bit codes grouped along head_dim, a float dtype, head_dim <= 256, and packed bytes that
    read as int32 words (group_size a multiple of 8; a view narrowed along L keeps that)."""
    c = packed_k.config
    return (c == packed_v.config and c.num_bits == 4 and packed_k.group_dim == 3
            and packed_v.group_dim == 3 and q.dtype in DTYPES and packed_k.dtype in DTYPES
            and packed_v.dtype in DTYPES and q.shape[-1] <= MAX_HEAD_DIM
            and _word_aligned(packed_k.data) and _word_aligned(packed_v.data))


@triton.jit
def _f32(bits, magic):
    """int32 bits below 2**23 OR-ed into magic = 2**23's bits, as float32: 2**23 + bits. (magic is
    a kernel argument, not a literal, so that AND and OR compile to one LOP3.)"""
    return (bits | magic).to(tl.float32, bitcast=True)


@triton.jit
def _units(p, HIGH: tl.constexpr):
    """(2**e, 2**-e), exactly, for byte p of a group: the weight `_codes` gives its low (HIGH
    False) or high nibble."""
    j = p % 4
    if HIGH:
        e = tl.where(j == 2, 8, tl.where(j == 3, 16, 8 * j + 4))
    else:
        e = tl.where(j == 3, 12, 8 * j)
    unit = ((127 + e) << 23).to(tl.float32, bitcast=True)
    return unit, ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _head_maps(NG: tl.constexpr, P: tl.constexpr, GS: tl.constexpr, PR: tl.constexpr,
               D: tl.constexpr, CENTER: tl.constexpr, HIGH: tl.constexpr):
    """For the (NG, P) bytes of a head's groups and their low (HIGH False) or high nibbles: the
    head dim each stands for, whether it is one, 2**23 + CENTER * 2**e (what `_codes` gives for
    code CENTER) and 2**-e."""
    g2, p2 = tl.arange(0, NG)[:, None], tl.arange(0, P)[None, :]
    unit, inv = _units(p2, HIGH)
    if HIGH:
        dim = g2 * GS + PR + p2
        ok = (p2 + PR < GS) & (dim < D)
    else:
        dim = g2 * GS + p2
        ok = (p2 < PR) & (dim < D)
    return dim, ok, 8388608.0 + CENTER * unit, inv


@triton.jit
def _codes(row, l3, g3, i3, ok3, s_l, s_g, m):
    """(BLOCK_L, NG, P) low and high nibbles of the bytes at positions l3, as 2**23 + code * 2**e
    (`_units`); bytes are read as int32 words (strides s_l, s_g in words; i3 a group's words)."""
    x = tl.load(row + l3 * s_l + g3 * s_g + i3, mask=ok3, other=0)
    t = x >> 12  # bits 20..31 (byte 2's high nibble, byte 3) down to 8..19, below float32's 2**23
    lo = tl.interleave(tl.interleave(_f32(x & 0x0F, m), _f32(x & 0x0F0000, m)),  # e = 0, 16
                       tl.interleave(_f32(x & 0x0F00, m), _f32(t & 0xF000, m)))  # e = 8, 12
    hi = tl.interleave(tl.interleave(_f32(x & 0xF0, m), _f32(t & 0x0F00, m)),    # e = 4, 8
                       tl.interleave(_f32(x & 0xF000, m), _f32(t & 0xF0000, m)))  # e = 12, 16
    return lo, hi


@triton.jit
def _scale_mid(sc_row, mn_row, l2, g2, ok2, s_l, s_g, SHIFT: tl.constexpr):
    """(BLOCK_L, NG) float32 scale and mid = mn + SHIFT * scale (the value of code CENTER) of
    positions l2."""
    sc = tl.load(sc_row + l2 * s_l + g2 * s_g, mask=ok2, other=0).to(tl.float32)
    mn = tl.load(mn_row + l2 * s_l + g2 * s_g, mask=ok2, other=0).to(tl.float32)
    return sc, mn + SHIFT * sc


@triton.jit
def _fold_new(o_lo, o_hi, l_i, m_i, q_lo, q_hi, kn, vn, n_row, sn_d, keep,
              d_lo, ok_lo, d_hi, ok_hi):
    """The softmax's sums with the new token (dense k, v at kn, vn + n_row) added."""
    FMIN: tl.constexpr = -3.4028234663852886e38
    kn_lo = tl.load(kn + n_row + d_lo * sn_d, mask=ok_lo, other=0).to(tl.float32)
    kn_hi = tl.load(kn + n_row + d_hi * sn_d, mask=ok_hi, other=0).to(tl.float32)
    s_new = tl.where(keep, tl.sum(tl.sum(q_lo * kn_lo + q_hi * kn_hi, axis=1), axis=0), FMIN)
    m_fin = tl.maximum(m_i, s_new)
    alpha, p_new = tl.exp(m_i - m_fin), tl.exp(s_new - m_fin)
    vn_lo = tl.load(vn + n_row + d_lo * sn_d, mask=ok_lo, other=0).to(tl.float32)
    vn_hi = tl.load(vn + n_row + d_hi * sn_d, mask=ok_hi, other=0).to(tl.float32)
    return o_lo * alpha + p_new * vn_lo, o_hi * alpha + p_new * vn_hi, l_i * alpha + p_new


@triton.jit
def _heads_decode_kernel(
        q, sq_b, sq_h, sq_d,
        kd, skd_b, skd_h, skd_l, skd_g, ks, km, sks_b, sks_h, sks_l, sks_g,
        vd, svd_b, svd_h, svd_l, svd_g, vs, vm, svs_b, svs_h, svs_l, svs_g,
        kn, vn, sn_b, sn_h, sn_d, mask, sm_b, sm_l, out, so_b, L, magic,
        D: tl.constexpr, GS: tl.constexpr, NGR: tl.constexpr, PR: tl.constexpr, NG: tl.constexpr,
        W: tl.constexpr, CENTER: tl.constexpr, SHIFT: tl.constexpr, BLOCK_L: tl.constexpr,
        HAS_NEW: tl.constexpr):
    FMIN: tl.constexpr = -3.4028234663852886e38  # torch.finfo(float32).min, what masked scores get
    RESCALE: tl.constexpr = 8.0
    P: tl.constexpr = 4 * W
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d_lo, ok_lo, sub_lo, inv_lo = _head_maps(NG, P, GS, PR, D, CENTER, False)          # (NG, P)
    d_hi, ok_hi, sub_hi, inv_hi = _head_maps(NG, P, GS, PR, D, CENTER, True)
    q_lo = tl.load(q + b * sq_b + h * sq_h + d_lo * sq_d, mask=ok_lo, other=0).to(tl.float32)
    q_hi = tl.load(q + b * sq_b + h * sq_h + d_hi * sq_d, mask=ok_hi, other=0).to(tl.float32)
    q_sum = tl.sum(q_lo + q_hi, axis=1)[None, :]                                       # (1, NG)
    qs_lo, qs_hi = (q_lo * inv_lo)[None, :, :], (q_hi * inv_hi)[None, :, :]
    sub_lo, sub_hi = sub_lo[None, :, :], sub_hi[None, :, :]
    g_sc = tl.arange(0, NG)[None, :]                                                   # (1, NG)
    g3, i3 = g_sc[:, :, None], tl.arange(0, W)[None, None, :]
    inner = (g3 < NGR) & (i3 * 4 < PR)                               # (1, NG, W): words that exist
    kd_row, vd_row = kd + b * skd_b + h * skd_h, vd + b * svd_b + h * svd_h
    ks_row, km_row = ks + b * sks_b + h * sks_h, km + b * sks_b + h * sks_h
    vs_row, vm_row = vs + b * svs_b + h * svs_h, vm + b * svs_b + h * svs_h
    m_i = tl.full((), float("-inf"), tl.float32)          # the softmax's reference point
    l_acc = tl.zeros((BLOCK_L,), tl.float32)              # per-position partial sums,
    acc_lo = tl.zeros((BLOCK_L, NG, P), tl.float32)       # reduced over positions after the loop
    acc_hi = tl.zeros((BLOCK_L, NG, P), tl.float32)
    acc_mid = tl.zeros((BLOCK_L, NG), tl.float32)
    for start in range(0, L, BLOCK_L):
        l = start + tl.arange(0, BLOCK_L)
        l_ok = l < L
        l3, ok3 = l[:, None, None], l_ok[:, None, None] & inner
        l2, ok2 = l[:, None], l_ok[:, None] & (g_sc < NGR)
        k_lo, k_hi = _codes(kd_row, l3, g3, i3, ok3, skd_l, skd_g, magic)
        k_sc, k_mid = _scale_mid(ks_row, km_row, l2, g_sc, ok2, sks_l, sks_g, SHIFT)
        dots = tl.sum((k_lo - sub_lo) * qs_lo + (k_hi - sub_hi) * qs_hi, axis=2)       # (BL, NG)
        s = tl.sum(k_sc * dots + k_mid * q_sum, axis=1)                                # (BL,)
        keep = tl.load(mask + b * sm_b + l * sm_l, mask=l_ok, other=0) != 0
        s = tl.where(l_ok, tl.where(keep, s, FMIN), float("-inf"))
        m_blk = tl.max(s, axis=0)
        if m_blk > m_i + RESCALE:
            alpha = tl.exp(m_i - m_blk)
            acc_lo, acc_hi, acc_mid = acc_lo * alpha, acc_hi * alpha, acc_mid * alpha
            l_acc *= alpha
            m_i = m_blk
        pr = tl.exp(s - m_i)
        v_lo, v_hi = _codes(vd_row, l3, g3, i3, ok3, svd_l, svd_g, magic)
        v_sc, v_mid = _scale_mid(vs_row, vm_row, l2, g_sc, ok2, svs_l, svs_g, SHIFT)
        used = pr[:, None] > 0  # zero weight (masked): skip, even if its scale, mn are not finite
        w = tl.where(used, pr[:, None] * v_sc, 0.0)[:, :, None]                        # (BL, NG, 1)
        acc_lo += w * (v_lo - sub_lo)
        acc_hi += w * (v_hi - sub_hi)
        acc_mid += tl.where(used, pr[:, None] * v_mid, 0.0)
        l_acc += pr
    mid_sum = tl.sum(acc_mid, axis=0)[:, None]                                         # (NG, 1)
    o_lo = tl.sum(acc_lo, axis=0) * inv_lo + mid_sum
    o_hi = tl.sum(acc_hi, axis=0) * inv_hi + mid_sum
    l_i = tl.sum(l_acc, axis=0)
    if HAS_NEW:  # the new token, last position
        keep_new = tl.load(mask + b * sm_b + L * sm_l) != 0
        o_lo, o_hi, l_i = _fold_new(o_lo, o_hi, l_i, m_i, q_lo, q_hi, kn, vn, b * sn_b + h * sn_h,
                                    sn_d, keep_new, d_lo, ok_lo, d_hi, ok_hi)
    inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)  # nothing at all to attend (L = 0): zeros
    out_row = out + b * so_b + h * D
    tl.store(out_row + d_lo, (o_lo * inv).to(out.dtype.element_ty), mask=ok_lo)
    tl.store(out_row + d_hi, (o_hi * inv).to(out.dtype.element_ty), mask=ok_hi)


def _word_aligned(data: torch.Tensor) -> bool:
    """Whether packed bytes (b, heads, L, n_groups, P) can be read as int32 words."""
    return (data.shape[-1] % 4 == 0 and data.stride(-1) == 1 and data.storage_offset() % 4 == 0
            and all(st % 4 == 0 for st in data.stride()[:-1]))


def _pieces(t: CompressedTensor):
    """data as int32 (b, heads, L, n_groups, P / 4) and scale, mn (b, heads, L, n_groups, 1)
    sharing strides."""
    scale, mn = t.scale, t.mn
    if scale.stride() != mn.stride():
        scale, mn = scale.contiguous(), mn.contiguous()
    return t.data.view(torch.int32), scale, mn


def decode_attention(q: torch.Tensor, packed_k: CompressedTensor, packed_v: CompressedTensor,
                     mask: torch.Tensor, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, block_l: int = BLOCK_L,
                     num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Fused `reference.heads_decode_attention` (same arguments, checked by the caller, and result:
    (b, 1, heads * head_dim) in q's dtype). No host sync, so a CUDA graph may capture it."""
    b, heads, _, d = q.shape
    length = packed_k.shape[2]
    c = packed_k.config
    ngr, pr = -(-d // c.group_size), comp.bytes_per_group(c)
    center = comp.zero_point(c) if c.symmetric else 1 << (c.num_bits - 1)
    kd, ks, km = _pieces(packed_k)
    vd, vs, vm = _pieces(packed_v)
    has_new = k_new is not None
    if has_new and k_new.stride() != v_new.stride():
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    kn, vn = (k_new, v_new) if has_new else (q, q)  # unread placeholders without a new token
    mask = mask.view(torch.uint8)
    out = torch.empty((b, 1, heads * d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    _heads_decode_kernel[(heads, b)](
        q, q.stride(0), q.stride(1), q.stride(3),
        kd, *kd.stride()[:4], ks, km, *ks.stride()[:4],
        vd, *vd.stride()[:4], vs, vm, *vs.stride()[:4],
        kn, vn, kn.stride(0), kn.stride(1), kn.stride(3), mask, mask.stride(0), mask.stride(1),
        out, out.stride(0), length, MAGIC,
        D=d, GS=c.group_size, NGR=ngr, PR=pr, NG=triton.next_power_of_2(ngr),
        W=triton.next_power_of_2(pr // 4), CENTER=center, SHIFT=center - comp.zero_point(c),
        BLOCK_L=block_l, HAS_NEW=has_new, num_warps=num_warps)
    return out
