"""Decode attention over the head-major compressed KV cache (b, heads, L, head_dim):
kernels.compressed_heads_decode_attention, its pure-torch reference and its Triton kernel.

The CPU tests check the reference against the runtime's maths (model.attention_math.decode_attention
on the decompressed cache) and against float64 attention written out here. The `gpu` tests check
the Triton kernel; without CUDA they are skipped, unless TRITON_INTERPRET=1 is set and triton is
installed, when they run in Triton's CPU interpreter (slow at the largest shapes).

Tolerances, as relative error norms ||out - expected|| / ||expected||:
  REF_TOL = 1e-5: float32 against float32 or float64 maths (about 1e-7 per operation, summed over
      at most a few hundred terms, then a softmax).
  EXACT_TOL: the kernel against float64 attention over the same dequantized values. The kernel
      computes in float32 and rounds once to the output dtype, so at most one unit roundoff:
      fp16 2**-11 = 4.9e-4, bf16 2**-8 = 3.9e-3, doubled for bf16 because Triton's CPU
      interpreter truncates to bf16 instead of rounding (float32: REF_TOL).
  KERNEL_TOL: the kernel against the reference. The reference rounds the dequantized cache, the
      scores (|score| up to ~5 here: 5 * 4.9e-4 = 2.4e-3 in a logit for fp16) and the probabilities
      to the dtype, the kernel does not; 4e-3 covers that for fp16, 3e-2 for bf16 (8x coarser).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from flexgen_repro import kernels
from flexgen_repro.compression import CompressedTensor, compress, decompress
from flexgen_repro.kernels import reference
from flexgen_repro.model.attention_math import decode_attention, merge_heads
from flexgen_repro.policy import CompressionConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gpu(test):
    """Mark a test of the Triton kernel: CUDA, or the interpreter with TRITON_INTERPRET=1."""
    runnable = HAS_TRITON and (torch.cuda.is_available() or INTERPRET)
    return pytest.mark.gpu(pytest.mark.skipif(not runnable, reason="needs CUDA and triton (or "
                                              "TRITON_INTERPRET=1 with triton installed)")(test))

REF_TOL = 1e-5
EXACT_TOL = {torch.float32: REF_TOL, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -7}
KERNEL_TOL = {torch.float32: REF_TOL, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CACHE = CompressionConfig(num_bits=4, group_size=64, group_dim=3, symmetric=False)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


def make_cache(b, heads, length, d, dtype, seed, narrowed=False, config=CACHE, device=DEVICE):
    """A compressed (b, heads, L, d) cache; narrowed: a view at position 3 of a longer buffer whose
    other slots hold NaN (so reading outside the view would show)."""
    packed = compress(rand(b, heads, length, d, dtype=dtype, seed=seed, device="cpu"), config)
    if not narrowed:
        return packed.to(device)
    buf = CompressedTensor.empty((b, heads, length + 7, d), config, dtype, device)
    buf.scale.fill_(float("nan"))
    buf.mn.fill_(float("nan"))
    buf.write_(2, 3, packed.to(device))
    return buf.narrow(2, 3, length)


def padded_mask(b, total, new: bool, device=DEVICE):
    """(b, total) with row r left-padded by a different amount; at least one real position."""
    mask = torch.ones(b, total, dtype=torch.bool)
    for r in range(b):
        mask[r, : (7 * r + total // 3) % max(1, total - 1)] = False
    return mask.to(device)


def inputs(b, heads, length, d, dtype, new, narrowed=False, config=CACHE, seed=0, device=DEVICE):
    q = rand(b, heads, 1, d, dtype=dtype, seed=seed, scale=d ** -0.5, device=device)
    k = make_cache(b, heads, length, d, dtype, seed + 1, narrowed, config, device)
    v = make_cache(b, heads, length, d, dtype, seed + 2, narrowed, config, device)
    kn = rand(b, heads, 1, d, dtype=dtype, seed=seed + 3, device=device) if new else None
    vn = rand(b, heads, 1, d, dtype=dtype, seed=seed + 4, device=device) if new else None
    return q, k, v, padded_mask(b, length + new, new, device), kn, vn


def dequant64(packed: CompressedTensor) -> torch.Tensor:
    """The cache's values without rounding them to its dtype (scale and mn widened first)."""
    wide = CompressedTensor(packed.data, packed.scale.double(), packed.mn.double(), packed.shape,
                            torch.float64, packed.config)
    return decompress(wide)


def attention64(q, k, v, mask, kn=None, vn=None):
    """Float64 decode attention over dense k, v (b, heads, L, d); masked scores get float32's min."""
    k, v = k.double(), v.double()
    if kn is not None:
        k, v = torch.cat([k, kn.double()], dim=2), torch.cat([v, vn.double()], dim=2)
    scores = (q.double() @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :],
                                                            torch.finfo(torch.float32).min)
    return merge_heads(torch.softmax(scores, dim=-1) @ v)


# ---- the reference (CPU) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("new", [False, True])
@pytest.mark.parametrize("narrowed", [False, True])
def test_reference_matches_the_runtime_maths(dtype, new, narrowed):
    q, k, v, mask, kn, vn = inputs(3, 4, 23, 32, dtype, new, narrowed, device="cpu")
    out = reference.heads_decode_attention(q, k, v, mask, kn, vn)
    expect = decode_attention(q, decompress(k), decompress(v), mask, 1.0, kn, vn)
    assert out.shape == (3, 1, 4 * 32) and out.dtype == dtype
    assert rel_err(out, expect) <= REF_TOL  # the same operations on the same values


@pytest.mark.parametrize("config", [CACHE, CompressionConfig(4, 16, 3, True),
                                    CompressionConfig(8, 64, 3, False), CompressionConfig(4, 8, 2, False)])
@pytest.mark.parametrize("new", [False, True])
def test_reference_against_float64_attention(config, new):
    q, k, v, mask, kn, vn = inputs(2, 3, 19, 24, torch.float32, new, config=config, device="cpu")
    out = kernels.compressed_heads_decode_attention(q, k, v, mask, kn, vn)  # CPU: the reference
    assert rel_err(out, attention64(q, dequant64(k), dequant64(v), mask, kn, vn)) <= REF_TOL


def test_hand_worked_cases():
    q, k, v, _, kn, vn = inputs(2, 2, 1, 16, torch.float32, True, device="cpu")
    one = torch.ones(2, 1, dtype=torch.bool)
    # one position: softmax weight 1, the output is that position's value
    assert torch.equal(kernels.compressed_heads_decode_attention(q, k, v, one), merge_heads(decompress(v)))
    # the cache fully masked, the new token attended: its value
    only_new = torch.tensor([[False, True]] * 2)
    out = kernels.compressed_heads_decode_attention(q, k, v, only_new, kn, vn)
    assert rel_err(out, merge_heads(vn)) <= REF_TOL
    # nothing attended at all: every score is float32's min, so the plain mean of all values
    q, k, v, *_ = inputs(1, 2, 5, 16, torch.float32, False, device="cpu")
    none = torch.zeros(1, 5, dtype=torch.bool)
    out = kernels.compressed_heads_decode_attention(q, k, v, none)
    assert rel_err(out, merge_heads(decompress(v).mean(dim=2, keepdim=True))) <= REF_TOL


def test_bad_arguments_name_the_fix():
    q, k, v, mask, kn, vn = inputs(2, 3, 5, 16, torch.float32, True, device="cpu")
    f = kernels.compressed_heads_decode_attention
    with pytest.raises(ValueError, match=r"\(batch, L \+ 1\) = \(2, 6\)"):
        f(q, k, v, mask[:, :5], kn, vn)
    with pytest.raises(ValueError, match="bool tensor"):
        f(q, k, v, mask.long(), kn, vn)
    with pytest.raises(ValueError, match="both k_new and v_new"):
        f(q, k, v, mask, kn, None)
    with pytest.raises(ValueError, match=r"\(batch, heads, 1, head_dim\)"):
        f(q[:, :, 0], k, v, mask, kn, vn)
    with pytest.raises(ValueError, match="packed_k must have shape"):
        f(q, k.narrow(1, 0, 2), v, mask, kn, vn)
    with pytest.raises(TypeError, match="one dtype"):
        f(q.half(), k, v, mask, kn, vn)
    with pytest.raises(TypeError, match="CompressedTensor"):
        f(q, decompress(k), v, mask, kn, vn)


# ---- the Triton kernel (CUDA, or the interpreter) ----

@pytest.mark.parametrize("b,length", [(b, n) for b in (1, 8, 72) for n in (1, 17, 544)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("new", [False, True], ids=["cached", "new"])
@pytest.mark.parametrize("narrowed", [False, True], ids=["whole", "narrowed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@gpu
def test_kernel_matches_reference(dtype, narrowed, new, d, b, length):
    from flexgen_repro.kernels import heads_attention
    heads = 2
    q, k, v, mask, kn, vn = inputs(b, heads, length, d, dtype, new, narrowed, seed=b + length)
    assert heads_attention.supports(q, k, v)
    out = heads_attention.decode_attention(q, k, v, mask, kn, vn)
    assert out.shape == (b, 1, heads * d) and out.dtype == dtype
    assert rel_err(out, attention64(q, dequant64(k), dequant64(v), mask, kn, vn)) <= EXACT_TOL[dtype]
    assert rel_err(out, reference.heads_decode_attention(q, k, v, mask, kn, vn)) <= KERNEL_TOL[dtype]


@gpu
@pytest.mark.parametrize("config,d,dtype", [
    (CompressionConfig(4, 64, 3, True), 128, torch.float16),     # symmetric
    (CompressionConfig(4, 32, -1, False), 128, torch.float16),   # 4 groups per head
    (CompressionConfig(4, 64, 3, False), 16, torch.float32),     # a tiny head: one padded group
    (CompressionConfig(4, 64, 3, False), 80, torch.float16),     # OPT-2.7B's head: 1.25 groups
    (CompressionConfig(4, 64, 3, False), 128, torch.bfloat16),
])
def test_kernel_other_configs(config, d, dtype):
    from flexgen_repro.kernels import heads_attention
    for new in (False, True):
        q, k, v, mask, kn, vn = inputs(3, 2, 45, d, dtype, new, narrowed=True, config=config)
        assert heads_attention.supports(q, k, v)
        out = heads_attention.decode_attention(q, k, v, mask, kn, vn)
        assert rel_err(out, attention64(q, dequant64(k), dequant64(v), mask, kn, vn)) <= EXACT_TOL[dtype]
        assert rel_err(out, reference.heads_decode_attention(q, k, v, mask, kn, vn)) <= KERNEL_TOL[dtype]


@gpu
def test_kernel_rescales_as_the_maximum_grows_and_skips_masked_garbage():
    """Scores rising by ~0.6 a position (the running maximum passes the rescale slack in every
    block); a masked stretch whose K and V scales are NaN (an unwritten slot: the kernel skips it,
    the reference would give NaN, so it gets a clean copy); a fully masked row (a plain mean)."""
    from flexgen_repro.kernels import heads_attention
    b, heads, length, d = 3, 2, 150, 64
    q = torch.full((b, heads, 1, d), d ** -0.5).to(DEVICE)
    rising = torch.linspace(-40, 50, length)[None, None, :, None] * d ** -0.5
    k = compress(rising + 0.1 * rand(b, heads, length, d, seed=5, device="cpu"), CACHE).to(DEVICE)
    v = make_cache(b, heads, length, d, torch.float32, 6)
    mask = torch.ones(b, length, dtype=torch.bool, device=DEVICE)
    mask[:2, 100:120] = False
    mask[2] = False
    clean_k, clean_v = (CompressedTensor(t.data, t.scale.clone(), t.mn.clone(), t.shape, t.dtype, t.config)
                        for t in (k, v))
    for t in (k, v):
        t.scale[:2, :, 100:120] = float("nan")
        t.mn[:2, :, 100:120] = float("inf")
    out = heads_attention.decode_attention(q, k, v, mask)
    expect = reference.heads_decode_attention(q, clean_k, clean_v, mask)
    assert rel_err(out, expect) <= REF_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_supports_only_what_the_kernel_handles():
    from flexgen_repro.kernels import heads_attention
    q, k, v, *_ = inputs(1, 2, 4, 64, torch.float16, False, device="cpu")
    assert heads_attention.supports(q, k, v)
    for config in (CompressionConfig(8, 64, 3, False), CompressionConfig(4, 64, 2, False),
                   CompressionConfig(4, 4, 3, False)):  # 8 bits; grouped along L; 2-byte groups
        q, k, v, *_ = inputs(1, 2, 4, 64, torch.float16, False, config=config, device="cpu")
        assert not heads_attention.supports(q, k, v)
    q, k, v, *_ = inputs(1, 1, 2, 512, torch.float16, False, device="cpu")
    assert not heads_attention.supports(q, k, v)  # head_dim above MAX_HEAD_DIM


@pytest.mark.gpu
@cuda_only
def test_dispatcher_uses_the_kernel_on_cuda_and_falls_back_for_other_configs():
    from flexgen_repro.kernels import heads_attention
    q, k, v, mask, kn, vn = inputs(4, 2, 33, 128, torch.float16, True, narrowed=True)
    fused = heads_attention.decode_attention(q, k, v, mask, kn, vn)
    assert torch.equal(kernels.compressed_heads_decode_attention(q, k, v, mask, kn, vn), fused)
    eight_bits = CompressionConfig(8, 64, 3, False)
    q, k, v, mask, kn, vn = inputs(4, 2, 33, 128, torch.float16, True, config=eight_bits)
    out = kernels.compressed_heads_decode_attention(q, k, v, mask, kn, vn)
    assert torch.equal(out, reference.heads_decode_attention(q, k, v, mask, kn, vn))


@pytest.mark.gpu
@cuda_only
def test_kernel_replays_in_a_cuda_graph():
    """Captured once, replayed after the inputs' contents change in place: no host data inside."""
    q, k, v, mask, kn, vn = inputs(8, 4, 64, 128, torch.float16, True, narrowed=True)
    fn = kernels.compressed_heads_decode_attention
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(q, k, v, mask, kn, vn)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(q, k, v, mask, kn, vn)
    q2, k2, v2, mask2, kn2, vn2 = inputs(8, 4, 64, 128, torch.float16, True, seed=40)
    mask2[3, :50] = False
    for dst, src in ((q, q2), (mask, mask2), (kn, kn2), (vn, vn2)):
        dst.copy_(src)
    k.copy_(k2)
    v.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    expect = reference.heads_decode_attention(q2, k2, v2, mask2, kn2, vn2)
    assert rel_err(out, expect) <= KERNEL_TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_runtime_attention_over_a_whole_compressed_home_buffer(dtype):
    """What SelfAttention._decode passes for a compressed cache part (the whole zero-filled home
    buffer, the unwritten tail masked, the new token separate) gives what decompressing and
    attending gives (both float32 softmax over the same decoded values: 16-bit rounding only)."""
    from flexgen_repro.model.layers import attend
    torch.manual_seed(3)
    b, heads, d, written, total = 3, 2, 64, 9, 16
    cfg = CompressionConfig(4, 64, 3, False)
    home = torch.zeros(b, heads, total, d, dtype=dtype, device=DEVICE)
    home[:, :, :written] = torch.randn(b, heads, written, d).to(DEVICE, dtype)
    packed_k, packed_v = compress(home, cfg), compress(home.flip(-1), cfg)
    q = (torch.randn(b, heads, 1, d) * d ** -0.5).to(DEVICE, dtype)
    k_new, v_new = (torch.randn(b, heads, 1, d).to(DEVICE, dtype) for _ in range(2))
    mask = torch.ones(b, total + 1, dtype=torch.bool, device=DEVICE)
    mask[:, written:total] = False  # the tail
    mask[0, :2] = False             # left padding
    got = attend(q, packed_k, packed_v, mask, 1.0, k_new, v_new, written)
    want = decode_attention(q, decompress(packed_k), decompress(packed_v), mask, 1.0, k_new, v_new,
                            written)
    # the reference rounds the probabilities to 16 bits before the value product, the kernel keeps
    # them in float32: two roundings at the output's magnitude (0.0 on the CPU, where both agree)
    tol = 2 * torch.finfo(dtype).eps * want.float().abs().max().item()
    assert got.shape == want.shape == (b, 1, heads * d)
    assert (got.float() - want.float()).abs().max().item() <= tol
