"""Rotary position embeddings and the `rope_scaling` variants Llama-family checkpoints use.

With d = head_dim and base = rope_theta, the inverse frequencies are
    inv_freq[i] = 1 / base ** (2i / d),  i = 0 .. d/2 - 1
and position p rotates the pair (x[i], x[i + d/2]) by the angle p * inv_freq[i]:
    rotate(x) = x * cos + rotate_half(x) * sin,  rotate_half(x) = (-x[d/2:], x[:d/2])
with cos and sin of the angles repeated over both halves, each scaled by an attention factor
(1 except for yarn). The variants change inv_freq (L = original_max_position_embeddings):
- linear:  inv_freq / factor.
- dynamic (NTK): base' = base * (factor * n / L - (factor - 1)) ** (d / (d - 2)) with
  n = max(L, the largest position of the step + 1); L is the model's max_position_embeddings.
- llama3:  wavelen = 2 pi / inv_freq; wavelen > L / low_freq_factor: inv_freq / factor;
  wavelen < L / high_freq_factor: unchanged; between: (1 - s) * inv_freq / factor + s * inv_freq
  with s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor).
- yarn: inv_freq = interp * (1 - e) + extrap * e with extrap = inv_freq, interp = inv_freq / factor,
  e = 1 - clamp((j - low) / (high - low), 0, 1) over j = 0 .. d/2 - 1, where low, high are the
  dimensions at which beta_fast and beta_slow rotations fit in L: dim(r) = d * ln(L / (2 pi r)) /
  (2 ln base), floored / ceiled (truncate), clamped to [0, d - 1]; the attention factor is
  attention_factor, else 0.1 * ln(factor) + 1 (or the ratio of that with mscale, mscale_all_dim).
These follow transformers' modeling_rope_utils (the same float32 operations, so float32 runs match
it bit for bit). All of it is tensor maths on the positions' device (CUDA-graph safe).
"""
from __future__ import annotations

import math

import torch

from flexgen_repro.config import RopeScaling


def _base_inv_freq(base: float, dim: int, device) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base ** exponents)


def _llama3(inv_freq: torch.Tensor, r: RopeScaling) -> torch.Tensor:
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (
        r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(base: float, dim: int, r: RopeScaling, device) -> tuple[torch.Tensor, float]:
    factor, orig = r.factor, r.original_max_position_embeddings
    if r.attention_factor is not None:
        attention = r.attention_factor
    elif r.mscale and r.mscale_all_dim:
        attention = float(_yarn_mscale(factor, r.mscale) / _yarn_mscale(factor, r.mscale_all_dim))
    else:
        attention = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_share = 1 - ramp.to(device=device, dtype=torch.float)
    return interpolation * (1 - extra_share) + extrapolation * extra_share, attention


def inverse_frequencies(config, device) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim / 2,) float32, attention factor) of a Llama-family config; for
    "dynamic" these are the unscaled ones (`cos_sin` rescales them per step)."""
    dim, base, r = config.head_dim, config.rope_theta, config.rope_scaling
    inv_freq = _base_inv_freq(base, dim, device)
    if r is None or r.rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    if r.rope_type == "linear":
        return inv_freq / r.factor, 1.0
    if r.rope_type == "llama3":
        return _llama3(inv_freq, r), 1.0
    return _yarn(base, dim, r, device)


def _dynamic_inv_freq(config, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK: frequencies for the step's longest sequence (unchanged up to max_seq_len)."""
    r = config.rope_scaling
    dim, factor, limit = config.head_dim, r.factor, r.original_max_position_embeddings
    seq_len = positions.max() + 1
    n = seq_len.clamp(min=limit)  # no new host tensor: safe inside a CUDA-graph capture
    base = config.rope_theta * ((factor * n / limit) - (factor - 1)) ** (dim / (dim - 2))
    # made on the device (a host tensor copied in would break a CUDA-graph capture)
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    scaled = 1.0 / (base ** exponents)
    return torch.where(seq_len > limit, scaled, inv_freq)


def cos_sin(config, positions: torch.Tensor, inv_freq: torch.Tensor, attention: float,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (b, 1, s, head_dim) in `dtype` for position ids (b, s)."""
    r = config.rope_scaling
    if r is not None and r.rope_type == "dynamic":
        inv_freq = _dynamic_inv_freq(config, positions, inv_freq)
    freqs = positions[:, :, None].float() * inv_freq.float()             # (b, s, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]                      # (b, 1, s, d)
    return (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, s, d) rotated by its positions' angles."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin
