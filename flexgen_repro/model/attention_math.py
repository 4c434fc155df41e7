"""Attention maths: prefill (causal, padded) and decode (dense or top-k sparse), on any device.

Tensors are (batch, seq, hidden) with heads interleaved as in OPT; scores use float32 softmax.
"""
from __future__ import annotations

import math

import torch


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    b, s, h = x.shape
    return x.view(b, s, n_head, h // n_head).transpose(1, 2)  # (b, heads, s, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, nh, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, nh * d)


def _softmax(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.softmax(scores.float(), dim=-1).to(dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      n_head: int) -> torch.Tensor:
    """Causal attention over a left-padded prompt. q, k, v: (b, s, h), q pre-scaled; mask (b, s)."""
    s = q.shape[1]
    qh, kh, vh = (split_heads(t, n_head) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2)                                   # (b, heads, s, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return merge_heads(_softmax(scores, q.dtype) @ vh)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     n_head: int, sparsity: float = 1.0) -> torch.Tensor:
    """One new token. q: (b, 1, h) pre-scaled; k, v: (b, L, h) with the new token last; mask (b, L).

    With `sparsity` < 1, each head attends to the new token and the top ceil(sparsity * (L - 1))
    earlier positions by score (masked positions never count); softmax runs over that set.
    """
    qh, kh, vh = (split_heads(t, n_head) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2)                                   # (b, heads, 1, L)
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    L = k.shape[1]
    if sparsity < 1.0 and L > 1:
        keep = max(1, math.ceil(sparsity * (L - 1)))
        prev = scores[..., :-1]
        top = prev.topk(keep, dim=-1).indices
        dropped = torch.ones_like(prev, dtype=torch.bool).scatter(-1, top, False)
        scores = torch.cat([prev.masked_fill(dropped, float("-inf")), scores[..., -1:]], dim=-1)
    return merge_heads(_softmax(scores, q.dtype) @ vh)
