"""Fused GPU kernels for compressed weights and caches, each with the pure-torch path it must match.

Every public function here picks the Triton kernel when its tensors are on CUDA, triton imports and
the config is one the kernel handles, and otherwise the reference (`kernels.reference`, also the
CPU path). Triton is imported only on that first path, so CPU machines never need it.

    dequant_linear(x, packed_w, bias)                      y = x @ dequant(W).T + bias
    compressed_decode_attention(q, packed_k, packed_v, mask, scale)      (b, s, hidden) cache
    compressed_heads_decode_attention(q, packed_k, packed_v, mask, k_new, v_new)
                                                           (b, heads, L, head_dim) cache
    quantize(x, config) / dequantize(packed)               compress / decompress in one kernel
"""
from __future__ import annotations

import importlib.util

import torch

from flexgen_repro import compression
from flexgen_repro.compression import CompressedTensor
from flexgen_repro.kernels import reference
from flexgen_repro.policy import CompressionConfig

__all__ = ["available", "dequant_linear", "compressed_decode_attention",
           "compressed_heads_decode_attention", "quantize", "dequantize"]


def available() -> bool:
    """True when CUDA is present and triton is importable (the fused paths can run)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _on_gpu(*tensors) -> bool:
    return all(t.is_cuda for t in tensors) and available()


def dequant_linear(x: torch.Tensor, packed_w: CompressedTensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ decompress(W).T + bias for a compressed (out, in) weight; x (..., in) -> (..., out)."""
    reference.check_linear(x, packed_w, bias)
    if _on_gpu(x, packed_w.data):
        from flexgen_repro.kernels import dequant_matmul
        return dequant_matmul.dequant_linear(x, packed_w, bias)
    return reference.dequant_linear(x, packed_w, bias)


def compressed_decode_attention(q: torch.Tensor, packed_k: CompressedTensor,
                                packed_v: CompressedTensor, mask: torch.Tensor | None = None,
                                scale: float | None = None) -> torch.Tensor:
    """Attention of one query per head over a compressed cache.

    q: (b, heads, head_dim); packed_k, packed_v: compressed (b, s, heads * head_dim) with groups
    along the hidden dim; mask: (b, s) bool, True where a position may be attended (None: all);
    scale: the softmax scale (default head_dim ** -0.5). Returns (b, heads, head_dim) in q's dtype;
    a row with nothing to attend gives zeros.
    """
    reference.check_attention(q, packed_k, packed_v, mask)
    if _on_gpu(q, packed_k.data, packed_v.data):
        from flexgen_repro.kernels import compressed_attention
        if compressed_attention.supports(q, packed_k, packed_v):
            return compressed_attention.decode_attention(q, packed_k, packed_v, mask, scale)
    return reference.decode_attention(q, packed_k, packed_v, mask, scale)


def compressed_heads_decode_attention(q: torch.Tensor, packed_k: CompressedTensor,
                                      packed_v: CompressedTensor, mask: torch.Tensor,
                                      k_new: torch.Tensor | None = None,
                                      v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one new token over a compressed head-major KV cache.

    Same result as model.attention_math.decode_attention(q, decompress(packed_k),
    decompress(packed_v), mask, 1.0, k_new, v_new). q: (b, heads, 1, d), pre-scaled by d ** -0.5;
    packed_k, packed_v: compressed (b, heads, L, d), any strides (e.g. narrowed out of a longer
    buffer); k_new, v_new: the new token's (b, heads, 1, d) or None (then it is already in the
    cache); mask: (b, L) or, with k_new, (b, L + 1) bool, True = attend, the new token last. All
    one dtype. Returns (b, 1, heads * d) in q's dtype; the softmax runs in float32. On CUDA with
    4-bit codes grouped along head_dim it is one Triton kernel with no host sync (CUDA-graph safe).
    """
    reference.check_heads_attention(q, packed_k, packed_v, mask, k_new, v_new)
    if _on_gpu(q, packed_k.data, packed_v.data, mask, *(t for t in (k_new, v_new) if t is not None)):
        from flexgen_repro.kernels import heads_attention
        if heads_attention.supports(q, packed_k, packed_v):
            return heads_attention.decode_attention(q, packed_k, packed_v, mask, k_new, v_new)
    return reference.heads_decode_attention(q, packed_k, packed_v, mask, k_new, v_new)


def quantize(x: torch.Tensor, config: CompressionConfig) -> CompressedTensor:
    """compression.compress, in one kernel on the GPU."""
    if _on_gpu(x):
        from flexgen_repro.kernels import dequant
        if dequant.supports(config, x.dtype):
            return dequant.quantize(x, config)
    return compression.compress(x, config)


def dequantize(packed: CompressedTensor) -> torch.Tensor:
    """compression.decompress, in one kernel on the GPU."""
    if _on_gpu(packed.data):
        from flexgen_repro.kernels import dequant
        if dequant.supports(packed.config, packed.dtype):
            return dequant.dequantize(packed)
    return compression.decompress(packed)
