"""The Triton kernels (flexgen_repro.kernels) against their pure-torch references.

Runs wherever triton is installed, and is skipped where it is not: on CUDA the kernels compile
and run on the GPU; without CUDA (CI installs triton with the development lock) the same checks run
them in Triton's CPU interpreter (tiny sizes; about 30 s on one core). The interpreter is switched
on for this module alone (the runtime never sends CPU tensors to triton: kernels.available() needs
CUDA), so the other test modules of a process, tests/test_kernels_heads.py's interpreter runs
included, see neither TRITON_INTERPRET nor an interpreted kernel.

Tolerances, as relative error norms ||out - ref|| / ||ref|| with the reference in float32 on the
same dequantized values:
  FP16_TOL = 2e-3: fp16 operands and an fp16 result (half an fp16 ulp is 2**-11 = 4.9e-4 relative;
                   the kernel's fused multiply-adds may move a dequantized weight by one fp16 ulp).
  FP32_TOL = 1e-5: float32 throughout (IEEE dot products, different summation order).
"""
from __future__ import annotations

import dataclasses

import importlib.util
import sys

import pytest
import torch

from flexgen_repro import kernels
from flexgen_repro.compression import CompressedTensor, compress, decompress
from flexgen_repro.kernels import reference
from flexgen_repro.policy import CompressionConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton (run on CUDA, or without CUDA in Triton's CPU interpreter)")]
KERNEL_MODULES = ("dequant", "dequant_matmul", "compressed_attention")  # what these tests import

if HAS_TRITON and DEVICE == "cpu" and "triton" not in sys.modules:
    # triton.language's own @triton.jit helpers (tl.cdiv, tl.sum, ...) are decorated when triton is
    # first imported, and the interpreter runs only interpreted ones: import it under the flag,
    # which is unset again at once (without CUDA nothing else runs a triton kernel)
    with pytest.MonkeyPatch.context() as _mp:
        _mp.setenv("TRITON_INTERPRET", "1")
        importlib.import_module("triton.language")


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """Without CUDA: TRITON_INTERPRET=1 and freshly imported kernel modules, for this module only.

    triton.jit reads TRITON_INTERPRET when it decorates a kernel, that is when its module is first
    imported: the kernel modules are dropped from sys.modules, so the tests import them afresh
    under the flag, and afterwards the environment and sys.modules are put back (an xdist worker
    runs many test modules in one process). With CUDA nothing changes."""
    if DEVICE == "cuda":
        yield
        return
    from triton.language import cdiv
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(cdiv, InterpretedFunction):
        pytest.fail("triton was imported in this process before this module, without "
                    "TRITON_INTERPRET=1, so its own @jit helpers cannot run in the interpreter: run "
                    "this module on its own or with TRITON_INTERPRET=1", pytrace=False)
    names = [f"{kernels.__name__}.{m}" for m in KERNEL_MODULES]
    saved_modules = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    saved_attrs = {m: vars(kernels).pop(m) for m in KERNEL_MODULES if m in vars(kernels)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        try:
            yield
        finally:
            for n, m in zip(names, KERNEL_MODULES):
                sys.modules.pop(n, None)
                vars(kernels).pop(m, None)
            sys.modules.update(saved_modules)
            vars(kernels).update(saved_attrs)


FP16_TOL = 2e-3
FP32_TOL = 1e-5
TOL = {torch.float16: FP16_TOL, torch.bfloat16: 8 * FP16_TOL, torch.float32: FP32_TOL}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output (an unwritten element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def rand(*shape, dtype=torch.float16, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("m", [1, 5, 24, 33])
@pytest.mark.parametrize("group_dim,symmetric", [(0, False), (1, False), (0, True)])
@pytest.mark.parametrize("overrides", [None, {"split": 1}, {"split": 3},
                                       {"split": 2, "BLOCK_OUT": 64, "BLOCK_K": 128}])
def test_fused_dequant_linear_matches_reference(m, group_dim, symmetric, overrides):
    from flexgen_repro.kernels import dequant_matmul
    n, k = 160, 192  # neither a multiple of a 128 block; 160 = 2.5 groups of 64
    config = CompressionConfig(4, 64, group_dim, symmetric)
    w = compress(rand(n, k, seed=1, scale=0.05), config)
    x, bias = rand(m, k, seed=2), rand(n, seed=3)
    assert dequant_matmul.supports_fused(x, w)
    out = dequant_matmul.dequant_linear(x, w, bias, overrides=overrides)
    ref = reference.dequant_linear(x, w, bias)
    assert out.shape == (m, n) and out.dtype == x.dtype
    assert rel_err(out, ref) < FP16_TOL


@pytest.mark.parametrize("group_dim", [0, 1])
def test_split_k_fused_dequant_linear_repeats_bit_for_bit(group_dim):
    """Split-K adds its splits' partial sums in one fixed order (no atomics), so a decode layer's
    output is the same bits every time (greedy tokens at near-ties then repeat too)."""
    from flexgen_repro.kernels import dequant_matmul
    n, k = 256, 1024
    w = compress(rand(n, k, seed=4, scale=0.05), CompressionConfig(4, 64, group_dim, False))
    x, bias = rand(16, k, seed=5), rand(n, seed=6)
    first = dequant_matmul.dequant_linear(x, w, bias, overrides={"split": 4})
    assert all(torch.equal(dequant_matmul.dequant_linear(x, w, bias, overrides={"split": 4}), first)
               for _ in range(10))
    assert rel_err(first, reference.dequant_linear(x, w, bias)) < FP16_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dequant_linear_other_dtypes_and_batched_input(dtype):
    from flexgen_repro.kernels import dequant_matmul
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's CPU interpreter (3.6, 3.7.1) mis-evaluates tl.dot on bfloat16 (CUDA is fine)")
    w = compress(rand(128, 128, dtype=dtype, seed=4), CompressionConfig(4, 64, 0, False))
    x = rand(2, 3, 128, dtype=dtype, seed=5)
    out = dequant_matmul.dequant_linear(x, w, None)
    assert out.shape == (2, 3, 128)
    assert rel_err(out, reference.dequant_linear(x, w, None)) < TOL[dtype]


def test_prefill_path_dequantizes_then_matmuls():
    from flexgen_repro.kernels import dequant_matmul
    m = dequant_matmul.DECODE_MAX_M + 7
    w = compress(rand(96, 64, seed=6), CompressionConfig(4, 32, 0, False))
    x, bias = rand(m, 64, seed=7), rand(96, seed=8)
    out = dequant_matmul.dequant_linear(x, w, bias)
    assert rel_err(out, reference.dequant_linear(x, w, bias)) < FP16_TOL


@pytest.mark.parametrize("config,shape,dtype", [
    (CompressionConfig(4, 64, 2, False), (3, 5, 256), torch.float16),   # the KV cache
    (CompressionConfig(4, 64, 0, False), (200, 48), torch.float16),     # a weight
    (CompressionConfig(4, 64, 0, True), (130, 3, 4), torch.bfloat16),
    (CompressionConfig(3, 20, 1, False), (4, 70, 6), torch.float32),
    (CompressionConfig(2, 16, -1, True), (7, 50), torch.float16),
    (CompressionConfig(8, 64, 1, False), (5, 64), torch.float16),
])
def test_quantize_and_dequantize_kernels_match_reference(config, shape, dtype):
    from flexgen_repro.kernels import dequant
    x = rand(*shape, dtype=dtype, seed=9)
    ref = compress(x, config)
    got = dequant.quantize(x, config)
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.mn, ref.mn)
    codes_differ = (got.data != ref.data).float().mean().item()
    assert codes_differ <= 1e-3, f"{codes_differ:.2%} of bytes differ from the reference"
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    dequant.dequantize(ref, out=out)
    expect = decompress(ref)
    # FMA vs mul+add: one rounding of the larger term, code * scale or mn, which exceeds the
    # result where they cancel (asymmetric groups around zero): bound by the terms' magnitude
    terms = decompress(dataclasses.replace(ref, scale=ref.scale.abs(), mn=ref.mn.abs())).float().abs()
    ulp = torch.finfo(dtype).eps * terms.clamp_min(torch.finfo(dtype).tiny)
    assert torch.isfinite(out).all()
    assert ((out.float() - expect.float()).abs() <= ulp).all()


@pytest.mark.parametrize("head_dim,heads,seq,block_s", [(128, 2, 70, 32), (64, 3, 17, 16), (128, 1, 130, 64)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_decode_attention_matches_reference(head_dim, heads, seq, block_s, with_mask):
    from flexgen_repro.kernels import compressed_attention
    b = 2
    config = CompressionConfig(4, 64, 2, False)
    k = compress(rand(b, seq, heads * head_dim, seed=10), config)
    v = compress(rand(b, seq, heads * head_dim, seed=11), config)
    q = rand(b, heads, head_dim, seed=12)
    mask = None
    if with_mask:  # left padding of 0 and 5 positions
        mask = torch.ones(b, seq, dtype=torch.bool, device=DEVICE)
        mask[1, :5] = False
    assert compressed_attention.supports(q, k, v)
    out = compressed_attention.decode_attention(q, k, v, mask, None, block_s=block_s)
    ref = reference.decode_attention(q, k, v, mask, None)
    assert out.shape == (b, heads, head_dim) and out.dtype == q.dtype
    assert rel_err(out, ref) < FP16_TOL


def test_decode_attention_on_a_narrowed_cache_buffer_with_garbage_in_masked_slots():
    """The runtime preallocates the cache and narrows it to the filled length: strided pieces."""
    from flexgen_repro.kernels import compressed_attention
    b, heads, head_dim, seq, cap = 3, 2, 128, 40, 64
    config = CompressionConfig(4, 64, 2, False)
    bufs = []
    for seed in (13, 14):
        buf = CompressedTensor.empty((b, cap, heads * head_dim), config, torch.float16, DEVICE)
        buf.scale.fill_(float("nan"))  # poison: masked and unwritten slots must not leak
        buf.write_(1, 3, compress(rand(b, seq - 3, heads * head_dim, seed=seed), config))
        bufs.append(buf.narrow(1, 0, seq))
    mask = torch.ones(b, seq, dtype=torch.bool, device=DEVICE)
    mask[:, :3] = False
    q = rand(b, heads, head_dim, seed=15)
    out = compressed_attention.decode_attention(q, bufs[0], bufs[1], mask, 0.1)
    ref = reference.decode_attention(q, bufs[0], bufs[1], mask, 0.1)
    assert rel_err(out, ref) < FP16_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatchers pick triton on CUDA only")
def test_dispatchers_pick_the_fused_path_on_cuda():
    assert kernels.available()
    w = compress(rand(256, 256, seed=16), CompressionConfig())
    x = rand(4, 256, seed=17)
    assert rel_err(kernels.dequant_linear(x, w), reference.dequant_linear(x, w)) < FP16_TOL
    packed = kernels.quantize(rand(4, 8, 256, seed=18), CompressionConfig(4, 64, 2, False))
    assert packed.device.type == "cuda"
    assert rel_err(kernels.dequantize(packed), decompress(packed)) < 1e-3
