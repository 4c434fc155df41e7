"""The CPU paths of flexgen_repro.kernels (the pure-torch references the GPU kernels must match)
against float64 maths written out by hand. Tolerance: REF_TOL = 1e-5 relative error norm, since the
references compute in float32 (about 1e-7 per operation, summed over at most a few hundred terms).
"""
from __future__ import annotations

import math

import pytest
import torch

from flexgen_repro import kernels
from flexgen_repro.compression import compress, decompress
from flexgen_repro.policy import CompressionConfig

REF_TOL = 1e-5


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("group_dim", [0, 1])
def test_dequant_linear_reference(group_dim):
    gen = torch.Generator().manual_seed(0)
    w = compress(torch.randn(48, 80, generator=gen), CompressionConfig(4, 16, group_dim, False))
    x, bias = torch.randn(2, 3, 80, generator=gen), torch.randn(48, generator=gen)
    wd = decompress(w).double()
    expect = torch.einsum("abi,oi->abo", x.double(), wd) + bias.double()
    out = kernels.dequant_linear(x, w, bias)
    assert out.shape == (2, 3, 48) and out.dtype == torch.float32
    assert rel_err(out, expect) < REF_TOL
    half = kernels.dequant_linear(x.half(), compress(torch.randn(48, 80).half(), CompressionConfig()))
    assert half.dtype == torch.float16


def naive_attention(q, k, v, mask, scale):
    """One query per head, written out with Python loops over batch and head, in float64."""
    b, heads, d = q.shape
    out = torch.zeros(b, heads, d, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            keep = [s for s in range(k.shape[1]) if mask is None or bool(mask[i, s])]
            if not keep:
                continue
            ks = k[i, keep, h * d:(h + 1) * d].double()
            vs = v[i, keep, h * d:(h + 1) * d].double()
            logits = ks @ q[i, h].double() * scale
            p = torch.exp(logits - logits.max())
            out[i, h] = (p / p.sum()) @ vs
    return out


def test_decode_attention_reference_with_mask_and_an_empty_row():
    gen = torch.Generator().manual_seed(1)
    b, heads, d, s = 3, 2, 64, 9
    config = CompressionConfig(4, 64, 2, False)
    k = compress(torch.randn(b, s, heads * d, generator=gen), config)
    v = compress(torch.randn(b, s, heads * d, generator=gen), config)
    q = torch.randn(b, heads, d, generator=gen)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, :4] = False
    mask[2] = False  # nothing to attend: zeros
    v.scale[1, :4] = float("nan")  # masked positions must not leak, even as NaN
    out = kernels.compressed_decode_attention(q, k, v, mask, 0.3)
    expect = naive_attention(q, decompress(k), decompress(v), mask, 0.3)
    assert torch.equal(out[2], torch.zeros(heads, d))
    assert rel_err(out, expect) < REF_TOL
    default_scale = kernels.compressed_decode_attention(q[:1], k.narrow(0, 0, 1), v.narrow(0, 0, 1))
    expect0 = naive_attention(q[:1], decompress(k)[:1], decompress(v)[:1], None, 1 / math.sqrt(d))
    assert rel_err(default_scale, expect0) < REF_TOL


def test_whole_tensor_dispatchers_fall_back_on_cpu():
    x = torch.randn(4, 130)
    config = CompressionConfig(4, 64, 1, True)
    packed = kernels.quantize(x, config)
    assert torch.equal(kernels.dequantize(packed), decompress(compress(x, config)))
    if not torch.cuda.is_available():
        assert not kernels.available()


def test_bad_shapes_are_named():
    w = compress(torch.randn(8, 16), CompressionConfig(4, 8, 0, False))
    with pytest.raises(ValueError, match=r"x \(..., in\)"):
        kernels.dequant_linear(torch.randn(2, 15), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.dequant_linear(torch.randn(2, 16), w, torch.randn(9))
    k = compress(torch.randn(2, 5, 64), CompressionConfig(4, 64, 2, False))
    with pytest.raises(ValueError, match="heads\\*head_dim=128"):
        kernels.compressed_decode_attention(torch.randn(2, 2, 64), k, k)
    with pytest.raises(ValueError, match="mask must be"):
        kernels.compressed_decode_attention(torch.randn(2, 1, 64), k, k, torch.ones(2, 4, dtype=torch.bool))
