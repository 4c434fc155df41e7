"""The reference quantizer (flexgen_repro.compression) against float64 maths and hand-worked cases.

Error bound used throughout (`error_bound`), per group, derived in the module docstring of
flexgen_repro.compression: with step* the exact step of the group (float64 maths on its exact min
and max) and M the group's largest magnitude,
    |x - decompress(compress(x))| <= HALF_STEP + STEP_ROUNDING + OUTPUT_ROUNDING + F32_SLACK
    HALF_STEP       = step* / 2                   (round to the nearest code; no code clips)
    STEP_ROUNDING   = ulp_d(step*) / 2            (the step is rounded *up* to the stored dtype d)
    OUTPUT_ROUNDING = ulp_d(M + step*) / 2        (the result is rounded to d)
    F32_SLACK       = 8 * 2**-24 * (M + step*)    (a handful of float32 operations)
The offset needs no term: the group min (asymmetric) or 0 (symmetric) is exact in d.
"""
from __future__ import annotations

import math

import pytest
import torch

from flexgen_repro import compression
from flexgen_repro.compression import CompressedTensor, compress, compressed_nbytes, decompress
from flexgen_repro.policy import CompressionConfig

MANTISSA = {torch.float16: (10, -14), torch.bfloat16: (7, -126), torch.float32: (23, -126)}
F32_SLACK_ULPS = 8


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values at magnitude v (float64), subnormals included."""
    mant, emin = MANTISSA[dtype]
    exp = torch.floor(torch.log2(v.abs().clamp_min(1e-300))).clamp_min(emin)
    return torch.pow(2.0, exp - mant)


def grouped(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """x as float64 (A, n_groups, group_size, C), padding filled with NaN."""
    g = config.group_dim % x.dim()
    a, length, c = math.prod(x.shape[:g]), x.shape[g], math.prod(x.shape[g + 1:])
    n = -(-length // config.group_size)
    x3 = x.double().reshape(a, length, c)
    pad = torch.full((a, n * config.group_size - length, c), float("nan"), dtype=torch.float64)
    return torch.cat([x3, pad], 1).view(a, n, config.group_size, c)


def error_bound(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """The per-element bound named in the module docstring, in x's shape."""
    xg = grouped(x, config)
    mx = torch.nan_to_num(xg, nan=-math.inf).amax(2, keepdim=True)
    mn = torch.nan_to_num(xg, nan=math.inf).amin(2, keepdim=True)
    big = torch.maximum(mx.abs(), mn.abs())
    b = config.num_bits
    step = big / (2 ** (b - 1) - 1) if config.symmetric else (mx - mn) / (2 ** b - 1)
    step = torch.where(mx == mn, torch.zeros_like(step), step)
    bound = (step / 2 + ulp(step, x.dtype) / 2 + ulp(big + step, x.dtype) / 2
             + F32_SLACK_ULPS * 2.0 ** -24 * (big + step))
    bound = torch.where(mx == mn, torch.zeros_like(bound), bound)  # constant groups are exact
    full = bound.expand_as(xg).reshape(xg.shape[0], -1, xg.shape[3])
    g = config.group_dim % x.dim()
    return full[:, :x.shape[g]].reshape(x.shape)


CASES = [  # (shape, group_size, group_dim)
    ((130,), 64, 0),
    ((7, 100), 64, 0),
    ((7, 100), 32, 1),
    ((3, 5, 70), 64, 2),
    ((3, 5, 70), 16, -1),
    ((4, 33, 6), 8, 1),
    ((2, 3, 4, 9), 5, 2),
]


@pytest.mark.parametrize("shape,group_size,group_dim", CASES)
@pytest.mark.parametrize("num_bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_within_half_step(shape, group_size, group_dim, num_bits, symmetric):
    config = CompressionConfig(num_bits, group_size, group_dim, symmetric)
    gen = torch.Generator().manual_seed(hash((shape, num_bits, symmetric)) % 2**31)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for magnitude in (1e-3, 1.0, 1e3):
            offset = torch.rand((), generator=gen) * magnitude * (0 if symmetric else 3)
            x = (torch.randn(shape, generator=gen) * magnitude + offset).to(dtype)
            y = decompress(compress(x, config))
            assert y.shape == x.shape and y.dtype == x.dtype
            err = (y.double() - x.double()).abs()
            bound = error_bound(x, config)
            worst = (err - bound).max().item()
            assert worst <= 0, f"{dtype} x{magnitude}: error exceeds bound by {worst}"


def test_bound_is_tight_enough_to_mean_something():
    """On smooth random data the worst error nearly reaches half a step (the bound is not loose)."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)).half()
    config = CompressionConfig(4, 64, 1, False)
    err = (decompress(compress(x, config)).double() - x.double()).abs()
    ratio = (err / error_bound(x, config)).max().item()
    assert 0.9 < ratio <= 1.0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_constant_groups_are_exact(symmetric, num_bits):
    config = CompressionConfig(num_bits, 4, 1, symmetric)
    x = torch.tensor([[3.7] * 4 + [0.0] * 4 + [-1e-3] * 4 + [65504.0] * 4 + [1.0, 2.0, 3.0, 4.0]]).half()
    packed = compress(x, config)
    y = decompress(packed)
    assert torch.equal(y[:, :16], x[:, :16])
    assert not torch.isnan(y).any()
    assert torch.equal(packed.scale[0, :4, 0], torch.zeros(4, dtype=torch.float16))


def test_hand_worked_packing():
    """[0, 1, 2, 3] at 4 bits, one group: min 0, step 3/15 = 0.2, codes 0, 5, 10, 15; planar
    packing puts values 0, 1 in the low nibbles of bytes 0, 1 and values 2, 3 in the high ones."""
    packed = compress(torch.tensor([0.0, 1.0, 2.0, 3.0]), CompressionConfig(4, 4, 0, False))
    assert packed.data.tolist() == [[0 | 10 << 4, 5 | 15 << 4]]
    assert packed.scale.tolist() == [[pytest.approx(0.2, rel=1e-7)]] and packed.mn.tolist() == [[0.0]]
    sym = compress(torch.tensor([-3.0, 1.5]), CompressionConfig(2, 2, 0, True))
    # symmetric 2 bits: step = 3 / 1, zero point 1: codes round(-1) + 1 = 0 and round(0.5) + 1 = 2
    assert sym.data.tolist() == [[0 | 2 << 2]] and sym.scale.tolist() == [[3.0]]
    assert decompress(sym).tolist() == [-3.0, 3.0]


def test_padding_of_a_partial_last_group():
    """70 values in groups of 64: the last group of 6 gets its own min and step; no pad leaks in."""
    x = torch.cat([torch.zeros(64), torch.linspace(10, 11.5, 6)]).view(1, 70)
    packed = compress(x, CompressionConfig(4, 64, 1, False))
    assert packed.data.shape == (1, 2, 32) and packed.scale.shape == (1, 2, 1)
    assert packed.mn[0, 1, 0].item() == 10.0
    assert packed.scale[0, 1, 0].item() == pytest.approx(1.5 / 15, rel=1e-6)
    assert torch.allclose(decompress(packed), x, atol=1.5 / 15 / 2 + 1e-6, rtol=0)


@pytest.mark.parametrize("config,shape", [
    (CompressionConfig(4, 64, 2, False), (3, 10, 128)),  # the KV cache layout
    (CompressionConfig(3, 16, 0, True), (40, 6, 5)),
    (CompressionConfig(8, 8, 1, False), (4, 20, 7)),
])
def test_narrow_and_write_match_compressing_the_full_tensor(config, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).half()
    full = compress(x, config)
    g = config.group_dim % len(shape)
    dim = next(d for d in range(len(shape)) if d != g and shape[d] > 1)
    start, length = 1, shape[dim] - 2
    part = compress(x.narrow(dim, start, length), config)
    view = full.narrow(dim, start, length)
    assert view.shape == part.shape
    for name, piece in part.components().items():
        assert torch.equal(view.components()[name], piece), name
    buf = CompressedTensor.empty(shape, config, x.dtype)
    cut = shape[dim] // 2
    buf.write_(dim, 0, compress(x.narrow(dim, 0, cut), config))
    buf.write_(dim, cut, compress(x.narrow(dim, cut, shape[dim] - cut), config))
    assert torch.equal(decompress(buf), decompress(full))
    with pytest.raises(ValueError, match="group dimension"):
        full.narrow(g, 0, 1)


def test_nbytes_and_accounting():
    x = torch.randn(256, 512).half()
    packed = compress(x, CompressionConfig(4, 64, 0, False))
    # data 256*512/2, scale and mn 2 * (256/64 * 512) * 2 bytes each
    assert packed.nbytes == 256 * 512 // 2 + 2 * 4 * 512 * 2
    assert packed.nbytes <= 0.3 * x.numel() * 2
    for config, shape in [(CompressionConfig(3, 10, -1, True), (5, 7, 33)),
                          (CompressionConfig(2, 64, 1, False), (3, 100)),
                          (CompressionConfig(8, 1, 0, False), (9,))]:
        p = compress(torch.randn(shape, dtype=torch.float32), config)
        assert compressed_nbytes(shape, config, 4) == p.nbytes
    # OPT-6.7B's FFN weight at the paper's setting: 0.28125x fp16
    assert compressed_nbytes((16384, 4096), CompressionConfig(), 2) / (16384 * 4096 * 2) == 0.28125


def test_to_and_components_round_trip():
    x = torch.randn(6, 100).bfloat16()
    config = CompressionConfig(4, 64, 1, True)
    packed = compress(x, config)
    rebuilt = CompressedTensor.from_components(
        {k: v.clone() for k, v in packed.components().items()}, packed.shape, packed.dtype, config)
    assert torch.equal(decompress(rebuilt), decompress(packed))
    assert torch.equal(decompress(CompressedTensor.from_components(packed.components(), packed.meta())),
                       decompress(packed))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        moved = packed.to(device).to("cpu")
        assert moved.shape == packed.shape and moved.config == config and moved.dtype == x.dtype
        for name, piece in packed.components().items():
            assert torch.equal(moved.components()[name], piece)
    with pytest.raises(ValueError, match="component 'scale' has shape"):
        CompressedTensor.from_components({**packed.components(), "scale": packed.scale[:1]},
                                         packed.shape, packed.dtype, config)


def test_chunked_compression_equals_one_pass(monkeypatch):
    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(2))
    for config in (CompressionConfig(4, 64, 0, False), CompressionConfig(4, 64, 1, True)):
        whole = compress(x, config)
        monkeypatch.setattr(compression, "CHUNK_ELEMENTS", 500)
        chunked = compress(x, config)
        assert torch.equal(decompress(chunked), decompress(whole))
        for name, piece in whole.components().items():
            assert torch.equal(chunked.components()[name], piece), name
        monkeypatch.undo()


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="floating-point"):
        compress(torch.arange(10), CompressionConfig())
    with pytest.raises(ValueError, match="group_dim=3 is out of range"):
        compress(torch.randn(4, 4), CompressionConfig(group_dim=3))
    with pytest.raises(ValueError, match="num_bits"):
        CompressionConfig(num_bits=1)
