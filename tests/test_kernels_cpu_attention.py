"""kernels.cpu_attention (the C decode-attention kernel) against float64 maths, and the runtime's
use of it: a CPU-attention policy goes through the kernel and still matches transformers."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import hf_greedy, random_prompts
from flexgen_repro import ExecutionEnv, OptLM, Policy, get_opt_config
from flexgen_repro.kernels import cpu_attention
from flexgen_repro.model.attention_math import decode_attention
from flexgen_repro.options import RuntimeOptions

pytestmark = pytest.mark.skipif(cpu_attention.library() is None, reason="no C compiler here")

# The kernel reads exact inputs and accumulates in float32 (relative error ~ positions * 2^-24,
# far below the output's own rounding), so the bound is the output dtype's half-ulp plus 1e-5.
OUT_EPS = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _case(dtype, b=3, heads=4, length=20, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (r(b, heads, 1, d) * 0.3, r(b, heads, length, d), r(b, heads, length, d),
            r(b, heads, 1, d), r(b, heads, 1, d))


def _bound(ref, dtype):
    return OUT_EPS[dtype] * ref.abs().amax() + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [24, 128, 13])  # 13: no full vector, scalar tail only
def test_matches_float64_with_unwritten_tail_and_padding(dtype, d):
    q, k, v, kn, vn = _case(dtype, d=d)
    valid = 15  # positions 15..19 unwritten: masked and never read
    mask = torch.ones(3, 21, dtype=torch.bool)
    mask[0, :3] = False          # left padding
    mask[:, valid:20] = False
    k[:, :, valid:] = float("nan")  # would poison the result if read
    v[:, :, valid:] = float("nan")
    ref = decode_attention(q.double(), k[:, :, :valid].double(), v[:, :, :valid].double(),
                           torch.cat([mask[:, :valid], mask[:, -1:]], 1), 1.0, kn.double(), vn.double())
    out = cpu_attention.decode_attention(q, k, v, mask, kn, vn, valid)
    assert out.dtype == dtype and out.shape == (3, 1, 4 * d)
    assert (out.double() - ref).abs().max() <= _bound(ref, dtype)


def test_strided_cache_and_no_new_token():
    """k, v narrowed out of a longer buffer (non-contiguous rows); the new token already in them."""
    buf_k, buf_v = torch.randn(2, 3, 40, 16).half(), torch.randn(2, 3, 40, 16).half()
    k, v = buf_k[:, :, 5:30], buf_v[:, :, 5:30]
    q = torch.randn(2, 3, 1, 16).half()
    mask = torch.rand(2, 25) > 0.3
    mask[:, -1] = True
    ref = decode_attention(q.double(), k.double(), v.double(), mask)
    out = cpu_attention.decode_attention(q, k, v, mask)
    assert (out.double() - ref).abs().max() <= _bound(ref, torch.float16)


def test_fully_masked_row_gives_zeros_and_threads_agree():
    q, k, v, kn, vn = _case(torch.float16, b=2)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1] = False
    one = cpu_attention.decode_attention(q, k, v, mask, kn, vn)
    assert torch.equal(one[1], torch.zeros_like(one[1]))
    # each (row, head) is summed by one thread in a fixed order: bitwise equal for any team size
    assert torch.equal(cpu_attention.decode_attention(q, k, v, mask, kn, vn, threads=1), one)


def test_bad_shapes_are_rejected():
    q, k, v, kn, vn = _case(torch.float32)
    with pytest.raises(ValueError, match="n_prev"):
        cpu_attention.decode_attention(q, k, v, torch.ones(3, 21, dtype=torch.bool), kn, vn, 30)
    with pytest.raises(ValueError, match="mask"):
        cpu_attention.decode_attention(q, k, v, torch.ones(3, 5, dtype=torch.bool), kn, vn)
    with pytest.raises(ValueError, match="k_new/v_new"):
        cpu_attention.decode_attention(q, k, v, torch.ones(3, 21, dtype=torch.bool), kn, None)
    with pytest.raises(ValueError, match="k_new/v_new"):
        cpu_attention.decode_attention(q, k, v, torch.ones(3, 21, dtype=torch.bool), kn[:2], vn[:2])


def test_no_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FLEXGEN_KERNEL_CACHE", str(tmp_path))
    cpu_attention.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="torch path"):
            assert cpu_attention.library() is None
        assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    finally:
        monkeypatch.undo()
        cpu_attention.library.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_attention.library() is not None


def test_runtime_cpu_attention_goes_through_the_kernel(tiny_opt, tmp_path, monkeypatch):
    model, ckpt, weights = tiny_opt
    config = get_opt_config(ckpt, dtype=np.float32)
    prompts = random_prompts(4, 9, config.vocab_size, seed=2, pad_rows=2)
    calls = []
    real = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    pol = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=20, w_cpu_percent=80,
                 cache_gpu_percent=0, cache_cpu_percent=100, act_gpu_percent=0, act_cpu_percent=100,
                 overlap=True, cpu_cache_compute=True)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        out = OptLM(config, env, weights, pol).generate(prompts, max_new_tokens=5)
    np.testing.assert_array_equal(out, hf_greedy(model, prompts, 5))
    assert len(calls) >= 4 * config.num_hidden_layers  # every decode step, layer and GPU batch


@pytest.mark.parametrize("options,calls_with", [
    (RuntimeOptions(cpu_attention_threads=1), [1]), (RuntimeOptions(cpu_attention_kernel=False), [])],
    ids=["one-thread", "kernel-off"])
def test_runtime_options_reach_the_kernel(tiny_opt, tmp_path, monkeypatch, options, calls_with):
    """RuntimeOptions.cpu_attention_threads is the kernel's team size; cpu_attention_kernel=False
    sends CPU attention to the torch path. Tokens stay transformers' either way."""
    model, ckpt, weights = tiny_opt
    config = get_opt_config(ckpt, dtype=np.float32)
    prompts = random_prompts(4, 9, config.vocab_size, seed=2, pad_rows=2)
    threads = []
    real = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention",
                        lambda *a, **k: threads.append(k["threads"]) or real(*a, **k))
    pol = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=20, w_cpu_percent=80,
                 cache_gpu_percent=0, cache_cpu_percent=100, act_gpu_percent=0, act_cpu_percent=100,
                 overlap=True, cpu_cache_compute=True)
    with ExecutionEnv.create(str(tmp_path / "offload"), options=options) as env:
        out = OptLM(config, env, weights, pol).generate(prompts, max_new_tokens=5)
    np.testing.assert_array_equal(out, hf_greedy(model, prompts, 5))
    assert sorted(set(threads)) == calls_with
