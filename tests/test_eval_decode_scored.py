"""Decode-scored perplexity (eval/decode_scored.py) against the prefill-scored one on the same
model: the same maths in another order, so at float32 they agree to DECODE_RTOL; with a 4-bit cache
only the decode-scored one changes."""
from __future__ import annotations

import numpy as np
import pytest

from flexgen_repro import CausalLM, ExecutionEnv, Policy, get_model_config
from flexgen_repro.eval import wikitext
from flexgen_repro.eval.decode_scored import decode_scored_perplexity
from llama_models import make_hf_llama, save_and_prepare

# float32 logits through 2 layers (~1e-6 relative), summed over 20 tokens
DECODE_RTOL = 1e-5


def _policy(**kw):
    return Policy(gpu_batch_size=1, num_gpu_batches=1, w_gpu_percent=50, w_cpu_percent=50,
                  cache_gpu_percent=0, cache_cpu_percent=100, act_gpu_percent=100, act_cpu_percent=0, **kw)


def test_decode_scored_equals_prefill_scored_and_sees_the_compressed_cache(tmp_path):
    model = make_hf_llama(kind="llama", hidden=64, heads=4, kv_heads=2, inter=128, seed=31)
    ckpt, weights = save_and_prepare(model, str(tmp_path), "tiny-ppl")
    config = get_model_config(ckpt, dtype=np.float32)
    ids = np.random.default_rng(0).integers(3, 128, size=24)
    prefix = 4
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        lm = CausalLM(config, env, weights, _policy())
        full = wikitext.evaluate(ids, lm.logits, context_len=len(ids), pad_id=config.pad_token_id)
        plain = decode_scored_perplexity(lm, ids, prefix)
        compressed = decode_scored_perplexity(CausalLM(config, env, weights, _policy(compress_cache=True)),
                                              ids, prefix)
    logp = wikitext._log_softmax64(lm.logits(ids[None]))[0]
    want = np.exp(-np.mean([logp[t - 1, ids[t]] for t in range(prefix, len(ids))]))
    assert plain["tokens"] == len(ids) - prefix and full["tokens"] == len(ids) - 1
    assert plain["perplexity"] == pytest.approx(want, rel=DECODE_RTOL)
    assert compressed["perplexity"] != pytest.approx(want, rel=DECODE_RTOL)


def test_decode_scored_refuses_a_block_of_several_prompts(tmp_path):
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        lm = CausalLM(get_model_config("llama-tiny", dtype=np.float32), env, "_DUMMY_",
                      Policy(gpu_batch_size=2, num_gpu_batches=1, w_gpu_percent=100, w_cpu_percent=0,
                             cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100,
                             act_cpu_percent=0))
        with pytest.raises(ValueError, match="gpu_batch_size 1"):
            decode_scored_perplexity(lm, np.arange(3, 20), 4)
