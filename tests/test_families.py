"""The Llama family end to end: tiny random LlamaForCausalLM (multi-head and grouped-query, tied
and untied, plain and scaled rotary embeddings), MistralForCausalLM (a sliding window shorter
than prompt + generation) and Qwen2ForCausalLM (q/k/v biases), saved with save_pretrained,
converted by prepare-weights, then run by OptLM under a representative set of policies.

Tolerance: none on tokens. Weights are rounded through fp16 first (llama_models.make_hf_llama),
so the fp16 weight folder holds them exactly and the float32 runtime computes what transformers
computes; each row of a left-padded mixed-length batch must equal transformers' greedy output on
that prompt alone.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import percent_policy as policy
from flexgen_repro import CausalLM, ExecutionEnv, get_model_config
from llama_models import PAD, hf_rows_alone, make_hf_llama, mixed_prompts, save_and_prepare

GEN = 7
PROMPT = 9


POLICIES = {
    "all-gpu": policy((100, 0, 100, 0, 100, 0), gpu_batch_size=4, num_gpu_batches=1),
    "weights-gpu-cpu-disk": policy((30, 30, 100, 0, 100, 0)),
    "cache-cpu-attention": policy((100, 0, 0, 100, 100, 0), cpu_cache_compute=True),
    "cache-split-cpu-attention": policy((50, 50, 30, 40, 100, 0), cpu_cache_compute=True),
    "cache-disk": policy((100, 0, 0, 0, 100, 0)),
    "activations-split": policy((50, 20, 40, 30, 30, 30)),
    "no-overlap": policy((40, 30, 30, 30, 100, 0), overlap=False),
    "joint-layers": policy((50, 50, 50, 50, 100, 0), sep_layer=False),
}

MODELS = {
    "llama-mha": dict(kind="llama"),
    "llama-gqa-tied": dict(kind="llama", kv_heads=2, tie=True),
    "llama-mqa-linear-rope": dict(kind="llama", kv_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-llama3-rope": dict(kind="llama", kv_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama-yarn-rope": dict(kind="llama", kv_heads=2, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-window": dict(kind="mistral", kv_heads=2, window=6),
    "qwen2-bias": dict(kind="qwen2", kv_heads=2),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (hf model, config, weight root, prompts, expected), made once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            index = list(MODELS).index(name)  # seeds by name: the same model in any test order
            model = make_hf_llama(seed=index + 1, **MODELS[name])
            ckpt, weights = save_and_prepare(model, str(root), f"tiny-{name}")
            config = get_model_config(ckpt, dtype=np.float32)
            prompts = mixed_prompts(4, PROMPT, seed=index)
            cache[name] = (model, config, weights, prompts, hf_rows_alone(model, prompts, GEN))
        return cache[name]
    return get


def generate(config, weights, pol, prompts, tmp_path, **kw):
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        return CausalLM(config, env, weights, pol).generate(prompts, max_new_tokens=GEN, **kw)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_greedy_tokens_equal_transformers(built, model_name, policy_name, tmp_path):
    model, config, weights, prompts, expected = built(model_name)
    out = generate(config, weights, POLICIES[policy_name], prompts, tmp_path)
    np.testing.assert_array_equal(out, expected, err_msg=f"{model_name} under {policy_name}")


def test_config_reads_the_family_flags(built):
    assert built("qwen2-bias")[1].attention_bias and not built("qwen2-bias")[1].attention_out_bias
    mistral = built("mistral-window")[1]
    assert (mistral.sliding_window, mistral.n_kv_head, mistral.model_type) == (6, 2, "mistral")
    tied = built("llama-gqa-tied")[1]
    assert tied.tie_word_embeddings and tied.family == "llama"
    rope = built("llama-llama3-rope")[1].rope_scaling
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("llama3", 8.0, 16)


def test_sliding_window_matters_here(built, tmp_path):
    """The window (6) is shorter than prompt + generation (16): ignoring it changes the tokens, so
    the equality above checks the window's prefill and decode masks."""
    model, config, weights, prompts, expected = built("mistral-window")
    unwindowed = dataclasses.replace(config, sliding_window=None)
    out = generate(unwindowed, weights, POLICIES["all-gpu"], prompts, tmp_path)
    assert (out != expected).any()


def test_rope_scaling_matters_here(built, tmp_path):
    """Each scaled model gives other tokens with plain rotary embeddings (positions reach 15)."""
    for name in ("llama-mqa-linear-rope", "llama-llama3-rope", "llama-yarn-rope"):
        model, config, weights, prompts, expected = built(name)
        plain = dataclasses.replace(config, rope_scaling=None)
        out = generate(plain, weights, POLICIES["all-gpu"], prompts, tmp_path)
        assert (out != expected).any(), name


def test_dynamic_rope_beyond_the_trained_length(tmp_path):
    """Dynamic NTK scaling changes the frequencies once the sequence outgrows
    max_position_embeddings (8 here, prompt + generation 16): equal-length rows, so the batch's
    longest sequence is each row's (transformers scales per forward call over the batch)."""
    model = make_hf_llama(kind="llama", kv_heads=2, seed=11, max_pos=8,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ckpt, weights = save_and_prepare(model, str(tmp_path), "tiny-dynamic")
    config = get_model_config(ckpt, dtype=np.float32)
    assert config.max_seq_len == 16
    prompts = np.random.default_rng(5).integers(3, 128, size=(4, 9))
    expected = hf_rows_alone(model, prompts, GEN)
    for name in ("all-gpu", "cache-cpu-attention", "weights-gpu-cpu-disk"):
        np.testing.assert_array_equal(generate(config, weights, POLICIES[name], prompts, tmp_path), expected)


def test_stop_pads_rows_after_the_stop_token(built, tmp_path):
    """`stop` works per row for the family (the pad id comes from the checkpoint: 0 here)."""
    model, config, weights, prompts, expected = built("llama-gqa-tied")
    stop = int(expected[0, PROMPT + 1])
    out = generate(config, weights, POLICIES["cache-disk"], prompts, tmp_path, stop=stop)
    for row, want in zip(out, expected):
        gen = list(want[PROMPT:])
        end = gen.index(stop) + 1 if stop in gen else GEN
        np.testing.assert_array_equal(row[:PROMPT + end], want[:PROMPT + end])
        assert (row[PROMPT + end:] == PAD).all()
