"""The Llama family with 4-bit weights, a 4-bit KV cache (per KV head) and top-k sparse attention.

- Compressed weights: transformers on the dequantized weights (the same quantizer, float32) is the
  reference; greedy tokens must be identical on every tier.
- Compressed cache: the same tokens on every tier and with CPU attention (the quantized values do
  not depend on where they live); against the uncompressed model the first generated token is
  identical (prefill reads the fresh keys and values) and most later ones agree (AGREEMENT).
- Sparse attention: a float64 transformers run whose attention keeps, per query head, the new
  token and the top ceil(sparsity * earlier positions) by score, as the runtime does.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import percent_policy as policy
from flexgen_repro import CausalLM, CompressionConfig, ExecutionEnv, get_model_config
from flexgen_repro.compression import compress, decompress
from llama_models import PAD, hf_rows_alone, make_hf_llama, mixed_prompts, save_and_prepare

GEN = 6
SPARSITY = 0.5
# measured with these seeds: 4-bit keys and values (groups of 16 along head_dim) keep 23 of 24
# later tokens; the bound leaves room for a few flips of near-tied logits
AGREEMENT = 0.75
PLACEMENTS = [(100, 0, 100, 0, 100, 0), (0, 100, 0, 100, 0, 100), (0, 0, 0, 0, 100, 0),
              (30, 30, 30, 30, 30, 30)]
SHAPE = dict(kind="llama", hidden=64, heads=4, kv_heads=2, inter=128)


@pytest.fixture(scope="module")
def gqa64(tmp_path_factory):
    """A 64-wide random Llama with 2 KV heads (one full group of 64 per weight column)."""
    root = tmp_path_factory.mktemp("gqa64")
    model = make_hf_llama(seed=21, **SHAPE)
    ckpt, weights = save_and_prepare(model, str(root), "tiny-gqa64")
    return model, get_model_config(ckpt, dtype=np.float32), weights, mixed_prompts(4, 9, seed=21)


def run(config, weights, pol, prompts, tmp_path):
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        return CausalLM(config, env, weights, pol).generate(prompts, max_new_tokens=GEN)


def test_compressed_weights_equal_transformers_on_dequantized_weights(gqa64, tmp_path):
    model, config, weights, prompts = gqa64
    fake = make_hf_llama(seed=21, **SHAPE)
    cfg = CompressionConfig(4, 64, 0, False)
    with torch.no_grad():
        for p in fake.parameters():
            if p.dim() >= 2:
                p.copy_(decompress(compress(p.detach().clone(), cfg)))  # float32 scales, as the run
    expected = hf_rows_alone(fake, prompts, GEN)
    assert (expected != hf_rows_alone(model, prompts, GEN)).any(), "quantization should matter here"
    for pct in PLACEMENTS:
        out = run(config, weights, policy(pct, compress_weight=True), prompts, tmp_path)
        np.testing.assert_array_equal(out, expected, err_msg=str(pct))


def test_compressed_cache_per_kv_head(gqa64, tmp_path):
    model, config, weights, prompts = gqa64
    outs = [run(config, weights, policy(pct, compress_cache=True, cpu_cache_compute=cpu), prompts, tmp_path)
            for pct in PLACEMENTS for cpu in (False, True)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    plain = hf_rows_alone(model, prompts, GEN)
    first = prompts.shape[1]
    np.testing.assert_array_equal(outs[0][:, :first + 1], plain[:, :first + 1])
    agreement = (outs[0][:, first + 1:] == plain[:, first + 1:]).mean()
    assert agreement >= AGREEMENT, agreement


def _topk_attention_f64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention interface: float64 softmax over the new token and the top
    ceil(SPARSITY * earlier positions) of each query head (every position in prefill)."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(group, dim=1) for t in (key, value))
    scores = (query @ key.transpose(2, 3)) * scaling
    if attention_mask is None:  # transformers leaves the mask out where plain causal suffices
        q_len, k_len = scores.shape[-2:]
        causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, -math.inf)
    else:
        mask = attention_mask[..., :key.shape[-2]]
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    if query.shape[2] == 1 and key.shape[2] > 1:
        prev = scores[..., :-1]
        keep = math.ceil(SPARSITY * prev.shape[-1])
        drop = torch.ones_like(prev, dtype=torch.bool).scatter(-1, prev.topk(keep, -1).indices, False)
        scores = torch.cat([prev.masked_fill(drop, -math.inf), scores[..., -1:]], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padding query sees nothing: zeros
    return (probs @ value).transpose(1, 2).contiguous(), probs


def test_sparse_attention_equals_float64_reference(gqa64, tmp_path):
    """The left-padded batch as one transformers batch (its cache is as long as the runtime's, so
    both keep the same number of earlier positions, padding included and never chosen over a
    real one)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    model, config, weights, prompts = gqa64
    AttentionInterface.register("flexgen_topk_f64", _topk_attention_f64)
    AttentionMaskInterface.register("flexgen_topk_f64", eager_mask)  # additive padding + causal mask
    ref = make_hf_llama(seed=21, **SHAPE).double()
    ref.config._attn_implementation = "flexgen_topk_f64"
    ids = torch.from_numpy(prompts)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=(ids != PAD).long(), max_new_tokens=GEN, do_sample=False,
                            pad_token_id=PAD).numpy()
    dense = hf_rows_alone(model, prompts, GEN)
    assert (want != dense).any(), "sparsity should matter here"
    for pct, cpu in (((100, 0, 100, 0, 100, 0), False), ((50, 50, 0, 100, 100, 0), True),
                     ((30, 30, 30, 30, 30, 30), False)):
        out = run(config, weights, policy(pct, attn_sparsity=SPARSITY, cpu_cache_compute=cpu), prompts,
                  tmp_path)
        np.testing.assert_array_equal(out, want, err_msg=str(pct))
