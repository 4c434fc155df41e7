"""Attention maths: prefill (causal, padded, optionally windowed) and decode (dense or top-k
sparse), on any device, with grouped-query attention.

Activations are (batch, seq, hidden); queries, keys and values are split into heads as
(batch, heads, seq, head_dim), the layout the KV cache is stored in, so decode reads each head's
cache as one contiguous block (fast batched matmuls on GPU and CPU alike, no copies). Keys and
values may have fewer heads than queries (grouped-query attention): query head h reads KV head
h // (n_head / n_kv_head), as transformers' repeat_kv lays them out.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Prefill attention on the GPU leaves out cuDNN's kernel, which plans anew for each new shape
# (every block width of a text job is one); the memory-efficient kernel takes any mask.
PREFILL_GPU_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Decode attention on the GPU leaves cuDNN's kernel out too: given the same inputs twice it returns
# different last bits (an OPT-1.3B decode step's logits moved by up to 0.008 between repeats, and
# greedy tokens at near-ties flipped); the memory-efficient and math kernels repeat exactly
# (docs/tuning.md). Flash attention takes no mask, so the memory-efficient kernel runs.
DECODE_GPU_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def gpu_kernels(q: torch.Tensor, backends: list):
    """The attention kernels `backends` in force for `q` on the GPU (nothing to choose on CPU)."""
    return sdpa_kernel(backends) if q.is_cuda else contextlib.nullcontext()


def to_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(b, s, heads * d) -> (b, heads, s, d), a view (head_dim contiguous). No copy: attention
    reads it strided, a cache store copies it into its home anyway, and for one token (decode) the
    view is contiguous already; a copy here was one more kernel per projection in prefill."""
    b, s, h = x.shape
    return x.view(b, s, n_head, h // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, heads, s, d) -> (b, s, heads * d)."""
    b, nh, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, nh * d)


def repeat_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(b, kv_heads, s, d) -> (b, n_head, s, d), each KV head repeated for its query heads."""
    b, kv, s, d = x.shape
    if kv == n_head:
        return x
    return x[:, :, None].expand(b, kv, n_head // kv, s, d).reshape(b, n_head, s, d)


def window_columns(length: int, last: torch.Tensor | int, window: int, device) -> torch.Tensor:
    """(length,) bool: the columns a query at column `last` may see within a sliding window
    (column c with last - c < window, as transformers' sliding_window_overlay)."""
    return torch.arange(length, device=device) > (last - window)


def prefill_allowed(mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(b, 1, s, s) bool: which keys each query of a left-padded prompt may see. mask (b, s) marks
    real tokens; causal, within the last `window` columns (itself included) where given; a padding
    query sees itself only (finite, never read). The same for every layer of a step."""
    s = mask.shape[1]
    eye = torch.eye(s, dtype=torch.bool, device=mask.device)
    causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    if window is not None:
        causal = causal & ~torch.ones(s, s, dtype=torch.bool, device=mask.device).tril(-window)
    return (causal[None] & (mask[:, None, :] | eye[None]))[:, None]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor, window: int | None = None,
                      allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over a left-padded prompt. q: (b, heads, s, d), pre-scaled; k, v:
    (b, kv_heads, s, d); mask (b, s) marks real tokens; `window`: each query sees only the last
    `window` columns; `allowed`: prefill_allowed(mask, window), made once per step by the caller."""
    allowed = prefill_allowed(mask, window) if allowed is None else allowed
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    with gpu_kernels(q, PREFILL_GPU_BACKENDS):
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     sparsity: float = 1.0, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, n_prev: int | None = None) -> torch.Tensor:
    """One new token per row. q: (b, heads, 1, d) pre-scaled; k, v: (b, kv_heads, L, d) earlier
    positions; k_new, v_new: (b, kv_heads, 1, d) the new token's (None: already last in k, v);
    mask (b, L_total) marks real positions. Returns (b, 1, heads * d).

    With `sparsity` < 1, each query head attends to the new token and the top
    ceil(sparsity * n_prev) earlier positions by its scores (masked positions never count);
    softmax runs over that set. `n_prev`: how many earlier positions exist (default: all of k;
    less when k's tail is unwritten). The query heads of one KV head form that head's rows, so
    grouped-query attention reads each KV head once.
    """
    b, heads, _, d = q.shape
    q = q.reshape(b, k.shape[1], heads // k.shape[1], d)                  # (b, kv_heads, group, d)
    scores = q @ k.transpose(-1, -2)                                      # (b, kv_heads, group, L)
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
    out = probs @ v if v_new is None else probs[..., :-1] @ v + probs[..., -1:] * v_new
    return merge_heads(out.reshape(b, heads, 1, d))
