"""4-bit compression inside the runtime: compressed weights and cache on every tier, split caches,
CPU attention and sparse attention; checked against transformers with fake-quantized weights."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import hf_logits, make_hf_opt, random_prompts, save_weight_folder
from conftest import percent_policy as policy
from flexgen_repro import CompressionConfig, ExecutionEnv, OptLM, get_opt_config
from flexgen_repro.compression import compress, decompress

PLACEMENTS = [(100, 0, 100, 0, 100, 0), (0, 100, 0, 100, 0, 100), (0, 0, 0, 0, 0, 0),
              (30, 30, 30, 30, 30, 30)]


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """A 64-wide random OPT (one full group of 64 per weight column) and its weight folder."""
    root = tmp_path_factory.mktemp("c64")
    model = make_hf_opt(hidden=64, heads=4, ffn=128, seed=3)
    ckpt = os.path.join(root, "hf", "opt-c64")
    model.save_pretrained(ckpt)
    save_weight_folder(model, os.path.join(root, "w"), "opt-c64")
    return model, get_opt_config(ckpt, dtype=np.float32), os.path.join(root, "w")


def test_compressed_weights_equal_transformers_with_fake_quantized_weights(model64, tmp_path):
    """The runtime's 4-bit weights compute exactly what HF computes on dequantized weights
    (same maths, float32): logits agree to 1e-4 absolute (float32 rounding), on every tier."""
    model, config, root = model64
    cfg = CompressionConfig(4, 64, 0, False)
    fake = make_hf_opt(hidden=64, heads=4, ffn=128, seed=3)
    with torch.no_grad():
        for name, p in fake.named_parameters():
            if p.dim() >= 2:
                p.copy_(decompress(compress(p.detach().clone(), cfg)))  # float32 scales, as the run
    prompts = random_prompts(4, 9, config.vocab_size, seed=4, pad_rows=2)
    ref = hf_logits(fake, prompts)
    real = prompts != 1
    for pct in PLACEMENTS:
        with ExecutionEnv.create(str(tmp_path / "off")) as env:
            lm = OptLM(config, env, root, policy(pct, compress_weight=True))
            np.testing.assert_allclose(lm.logits(prompts)[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("cpu_attn", [False, True])
def test_compressed_cache_is_placement_independent(model64, tmp_path, cpu_attn):
    """A 4-bit cache on any tier, split, with CPU attention or not, sparse or dense, gives the
    same tokens as the all-GPU compressed run (the quantized values do not depend on the tier)."""
    model, config, root = model64
    prompts = random_prompts(5, 9, config.vocab_size, seed=5, pad_rows=3)
    for sparsity in (1.0, 0.5):
        outs = []
        for pct in PLACEMENTS:
            with ExecutionEnv.create(str(tmp_path / "off")) as env:
                pol = policy(pct, compress_cache=True, compress_weight=True, attn_sparsity=sparsity,
                             cpu_cache_compute=cpu_attn)
                outs.append(OptLM(config, env, root, pol).generate(prompts, max_new_tokens=5))
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])


def test_compressed_cache_tokens_close_to_uncompressed(model64, tmp_path):
    """4-bit cache quantization perturbs attention only slightly: with this model at least 80% of
    the greedy tokens match the uncompressed run (measured: all 25 of 25 match)."""
    model, config, root = model64
    prompts = random_prompts(5, 9, config.vocab_size, seed=6, pad_rows=3)
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        plain = OptLM(config, env, root, policy(PLACEMENTS[3])).generate(prompts, max_new_tokens=5)
        comp = OptLM(config, env, root, policy(PLACEMENTS[3], compress_cache=True)).generate(
            prompts, max_new_tokens=5)
    gen = slice(prompts.shape[1], None)
    assert (plain[:, gen] == comp[:, gen]).mean() >= 0.8


def test_memory_accounting_reports_compressed_sizes(model64, tmp_path):
    """Placement works on compressed sizes: 4-bit weights take at most 0.3x their fp16 bytes."""
    from flexgen_repro.model.weight_home import stored_bytes
    model, config, root = model64
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        lm = OptLM(config, env, root, policy(PLACEMENTS[0], compress_weight=True))
        spec = lm.layers[1].specs()[0]
        assert stored_bytes(spec, lm.policy, 2) <= 0.3 * spec.numel * 2
        stored = lm.weight_home[1][spec.key]
        assert stored.nbytes <= 0.3 * spec.numel * 4  # float32 run: scale and min in float32


def test_compressed_weights_are_dequantized_once_per_layer_and_token(model64, tmp_path, monkeypatch):
    """From DEQUANTIZE_ONCE_MIN_BATCHES GPU batches (policy.dequantize_once) each layer's
    compressed weights are decompressed at the layer's first batch and shared by the others: as
    many decompressions as one batch of all the rows makes, a quarter of what four batches make
    each on their own; the tokens are those of per-batch dequantization (the same float32 maths)."""
    from flexgen_repro import compression
    from flexgen_repro import policy as policy_module
    model, config, root = model64
    prompts = random_prompts(4, 9, config.vocab_size, seed=6, pad_rows=2)
    real, calls = compression.decompress, []
    monkeypatch.setattr(compression, "decompress", lambda t: calls.append(1) or real(t))

    def run(b, k):
        calls.clear()
        with ExecutionEnv.create(str(tmp_path / "off")) as env:
            pol = policy((0, 100, 100, 0, 100, 0), gpu_batch_size=b, num_gpu_batches=k,
                         compress_weight=True)
            out = OptLM(config, env, root, pol).generate(prompts, max_new_tokens=4)
        return out, len(calls)
    one_batch, per_token = run(4, 1)
    monkeypatch.setattr(policy_module, "DEQUANTIZE_ONCE_MIN_BATCHES", 4)
    once, once_calls = run(1, 4)
    monkeypatch.setattr(policy_module, "DEQUANTIZE_ONCE_MIN_BATCHES", 5)
    each, each_calls = run(1, 4)
    assert per_token > 0 and once_calls == per_token and each_calls == 4 * per_token
    np.testing.assert_array_equal(once, each)
    np.testing.assert_array_equal(once, one_batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (float16, the fused 4-bit matmul)")
def test_dequantize_once_on_the_gpu_matches_the_fused_matmul(model64, tmp_path, monkeypatch):
    """On the GPU in float16, layers dequantized once for their 8 GPU batches (dequantize kernel,
    cuBLAS matmuls) and the fused 4-bit matmul of every batch give the same logits up to float16
    rounding: 5e-2 absolute on logits of order 1 (each float16 matmul rounds at about 1e-3 of its
    inputs' scale; two layers and the output projection, summed in a different order)."""
    from flexgen_repro import policy as policy_module
    _, _, root = model64
    config = get_opt_config(os.path.join(os.path.dirname(root), "hf", "opt-c64"), dtype=np.float16)
    prompts = random_prompts(8, 9, config.vocab_size, seed=7, pad_rows=2)
    out = {}
    for name, least in (("once", 8), ("fused", 9)):
        monkeypatch.setattr(policy_module, "DEQUANTIZE_ONCE_MIN_BATCHES", least)
        with ExecutionEnv.create(str(tmp_path / "off")) as env:
            pol = policy((0, 100, 100, 0, 100, 0), gpu_batch_size=1, num_gpu_batches=8,
                         compress_weight=True)
            out[name] = OptLM(config, env, root, pol).logits(prompts)
    real = prompts != 1
    assert np.isfinite(out["once"][real]).all()
    np.testing.assert_allclose(out["once"][real], out["fused"][real], atol=5e-2, rtol=0)
