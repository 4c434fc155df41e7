"""Pure-torch references for the fused kernels: the CPU fallback and what the GPU kernels must match.

All decompress first (as the original FlexGen does, with a chain of torch operations). The linear
and the (b, s, hidden) attention then compute in float32; the head-major attention follows the
runtime's decode maths (model.attention_math) exactly. Each returns the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flexgen_repro.compression import CompressedTensor, decompress


def check_linear(x: torch.Tensor, packed_w: CompressedTensor, bias) -> None:
    if len(packed_w.shape) != 2 or x.shape[-1] != packed_w.shape[1]:
        raise ValueError(f"dequant_linear needs x (..., in) and a compressed (out, in) weight, got x "
                         f"{tuple(x.shape)} and weight {tuple(packed_w.shape)}")
    if bias is not None and tuple(bias.shape) != (packed_w.shape[0],):
        raise ValueError(f"dequant_linear bias must have shape ({packed_w.shape[0]},), got {tuple(bias.shape)}")


def dequant_linear(x: torch.Tensor, packed_w: CompressedTensor, bias=None) -> torch.Tensor:
    """x @ decompress(W).T + bias, in float32, returned in x's dtype. x: (..., in); W: (out, in)."""
    check_linear(x, packed_w, bias)
    w = decompress(packed_w).float()
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def check_attention(q: torch.Tensor, packed_k: CompressedTensor, packed_v: CompressedTensor,
                    mask) -> None:
    b, heads, head_dim = q.shape
    for name, t in (("K", packed_k), ("V", packed_v)):
        if len(t.shape) != 3 or t.shape[0] != b or t.shape[2] != heads * head_dim:
            raise ValueError(f"compressed_decode_attention needs {name} of shape (batch={b}, seq, "
                             f"heads*head_dim={heads * head_dim}), got {tuple(t.shape)}")
    if tuple(packed_k.shape) != tuple(packed_v.shape):
        raise ValueError(f"K {tuple(packed_k.shape)} and V {tuple(packed_v.shape)} differ in shape")
    if mask is not None and tuple(mask.shape) != tuple(packed_k.shape[:2]):
        raise ValueError(f"mask must be (batch, seq) = {tuple(packed_k.shape[:2])}, got {tuple(mask.shape)}")


def decode_attention(q: torch.Tensor, packed_k: CompressedTensor, packed_v: CompressedTensor,
                     mask=None, scale: float | None = None) -> torch.Tensor:
    """softmax(q K^T * scale, masked) V for one query per head, in float32.

    q: (b, heads, head_dim); K, V compressed (b, s, heads * head_dim); mask: (b, s) bool, True =
    attend. A row with no position to attend gives zeros. Returns (b, heads, head_dim), q's dtype.
    """
    check_attention(q, packed_k, packed_v, mask)
    b, heads, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    k = decompress(packed_k).float().view(b, -1, heads, head_dim)
    v = decompress(packed_v).float().view(b, -1, heads, head_dim)
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k) * scale
    if mask is not None:  # masked positions may hold anything (an unwritten cache slot): drop them
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        v = v.masked_fill(~mask.bool()[:, :, None, None], 0.0)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return torch.einsum("bhs,bshd->bhd", probs, v).to(q.dtype)


def check_heads_attention(q: torch.Tensor, packed_k: CompressedTensor, packed_v: CompressedTensor,
                          mask: torch.Tensor, k_new: torch.Tensor | None = None,
                          v_new: torch.Tensor | None = None) -> None:
    """Validate heads_decode_attention's arguments; raise naming the expected shapes."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"compressed_heads_decode_attention needs q of shape (batch, heads, 1, "
                         f"head_dim), got {tuple(q.shape)}")
    b, heads, _, d = q.shape
    for name, t in (("packed_k", packed_k), ("packed_v", packed_v)):
        if not isinstance(t, CompressedTensor):
            raise TypeError(f"{name} must be a CompressedTensor (compress the cache), got {type(t).__name__}")
        if len(t.shape) != 4 or tuple(t.shape[:2]) != (b, heads) or t.shape[3] != d:
            raise ValueError(f"{name} must have shape (batch={b}, heads={heads}, L, head_dim={d}), "
                             f"got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} holds {t.dtype} but q is {q.dtype}; use one dtype for q and the cache")
    if tuple(packed_k.shape) != tuple(packed_v.shape):
        raise ValueError(f"packed_k {tuple(packed_k.shape)} and packed_v {tuple(packed_v.shape)} differ")
    if (k_new is None) != (v_new is None):
        raise ValueError("pass both k_new and v_new (the new token's) or neither")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is not None and (tuple(t.shape) != (b, heads, 1, d) or t.dtype != q.dtype):
            raise ValueError(f"{name} must be {q.dtype} of shape {(b, heads, 1, d)}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    total = packed_k.shape[2] + (k_new is not None)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, total):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        plus = " + 1" if k_new is not None else ""
        raise ValueError(f"mask must be a bool tensor of shape (batch, L{plus}) = {(b, total)}, True "
                         f"where a position is attended; got {got}")
    if total == 0:
        raise ValueError("compressed_heads_decode_attention needs at least one position to attend over")


def dense_heads_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                 k_new: torch.Tensor | None = None,
                                 v_new: torch.Tensor | None = None) -> torch.Tensor:
    """model.attention_math.decode_attention at sparsity 1, restated here (kernels sit below the
    model and may not import it; tests check the two agree). q: (b, heads, 1, d) pre-scaled; k, v:
    (b, heads, L, d); k_new, v_new: (b, heads, 1, d) or None; mask (b, L or L + 1) bool.
    A masked score becomes float32's min (not -inf): a row with nothing to attend averages all
    positions. Returns (b, 1, heads * d) in q's dtype."""
    scores = q @ k.transpose(-1, -2)                                      # (b, heads, 1, L)
    if k_new is not None:
        scores = torch.cat([scores, (q * k_new).sum(-1, keepdim=True)], dim=-1)
    scores = scores.float().masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = probs @ v if v_new is None else probs[..., :-1] @ v + probs[..., -1:] * v_new
    b, heads, _, d = out.shape
    return out.transpose(1, 2).reshape(b, 1, heads * d)


def heads_decode_attention(q: torch.Tensor, packed_k: CompressedTensor, packed_v: CompressedTensor,
                           mask: torch.Tensor, k_new: torch.Tensor | None = None,
                           v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over a compressed head-major cache (b, heads, L, d): decompress K and V,
    then `dense_heads_decode_attention`. Returns (b, 1, heads * d) in q's dtype."""
    check_heads_attention(q, packed_k, packed_v, mask, k_new, v_new)
    return dense_heads_decode_attention(q, decompress(packed_k), decompress(packed_v), mask, k_new, v_new)
