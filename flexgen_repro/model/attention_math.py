"""Attention maths: prefill (causal, padded) and decode (dense or top-k sparse), on any device.

Activations are (batch, seq, hidden); queries, keys and values are split into heads as
(batch, heads, seq, head_dim), the layout the KV cache is stored in, so decode reads each head's
cache as one contiguous block (fast batched matmuls on GPU and CPU alike, no copies).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(b, s, h) -> contiguous (b, heads, s, d)."""
    b, s, h = x.shape
    return x.view(b, s, n_head, h // n_head).transpose(1, 2).contiguous()


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, heads, s, d) -> (b, s, heads * d)."""
    b, nh, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, nh * d)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """Causal attention over a left-padded prompt. q, k, v: (b, heads, s, d), q pre-scaled;
    mask (b, s) marks real tokens. A padding query attends to itself only (finite, never read)."""
    s = q.shape[2]
    eye = torch.eye(s, dtype=torch.bool, device=q.device)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None] & (mask[:, None, :] | eye[None])               # (b, s, s)
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=1.0))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     sparsity: float = 1.0, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, n_prev: int | None = None) -> torch.Tensor:
    """One new token per row. q: (b, heads, 1, d) pre-scaled; k, v: (b, heads, L, d) earlier
    positions; k_new, v_new: (b, heads, 1, d) the new token's (None: already last in k, v);
    mask (b, L_total) marks real positions. Returns (b, 1, hidden).

    With `sparsity` < 1, each head attends to the new token and the top ceil(sparsity * n_prev)
    earlier positions by score (masked positions never count); softmax runs over that set.
    `n_prev`: how many earlier positions exist (default: all of k; less when k's tail is unwritten).
    """
    scores = q @ k.transpose(-1, -2)                                      # (b, heads, 1, L)
    if k_new is not None:
        scores = torch.cat([scores, (q * k_new).sum(-1, keepdim=True)], dim=-1)
    scores = scores.float().masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    n_prev = scores.shape[-1] - 1 if n_prev is None else n_prev
    if sparsity < 1.0 and n_prev > 0:
        keep = max(1, math.ceil(sparsity * n_prev))
        prev = scores[..., :-1]
        dropped = torch.ones_like(prev, dtype=torch.bool).scatter(-1, prev.topk(keep, -1).indices, False)
        scores = torch.cat([prev.masked_fill(dropped, float("-inf")), scores[..., -1:]], dim=-1)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if v_new is None:
        return merge_heads(probs @ v)
    return merge_heads(probs[..., :-1] @ v + probs[..., -1:] * v_new)
