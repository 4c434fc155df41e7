"""Pure-torch references for the fused kernels: the CPU fallback and what the GPU kernels must match.

Both decompress first (as the original FlexGen does, with a chain of torch operations) and then
compute in float32, returning the input's dtype.
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
