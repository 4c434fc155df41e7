"""Sizes and flops of the Llama family, worked by hand: weights, KV cache per KV head, SwiGLU and
grouped-query attention, as LlamaConfig and the cost model count them (exact integers)."""
from __future__ import annotations

import pytest

from flexgen_repro import Policy, get_model_config
from flexgen_repro.cost_model.equations import model_sizes
from flexgen_repro.cost_model.placement import layer_tensors

GPU = Policy(gpu_batch_size=1, num_gpu_batches=1, w_gpu_percent=100, w_cpu_percent=0,
             cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)

# Llama-2-7B: 32 layers, hidden 4096, 32 heads of 128, 32 KV heads, MLP 11008, vocab 32000, untied.
#   attention: q, k, v, o = 4 x 4096 x 4096          =    67,108,864
#   SwiGLU:    gate, up, down = 3 x 4096 x 11008      =   135,266,304
#   two RMSNorms: 2 x 4096                            =         8,192
#   one layer                                         =   202,383,360; x 32 = 6,476,267,520
#   embed_tokens + lm_head: 2 x 32000 x 4096          =   262,144,000; final norm 4,096
#   total 6,738,415,616 parameters; fp16: x 2 = 13,476,831,232 bytes
# KV cache per token (fp16): 2 (K, V) x 32 layers x 32 KV heads x 128 x 2 bytes = 524,288 bytes
LLAMA_2_7B_BYTES = 13_476_831_232
LLAMA_2_7B_KV_TOKEN = 524_288
LLAMA_2_7B_LAYER = 202_383_360
# Llama-2-70B: 80 layers, hidden 8192, 64 heads of 128, 8 KV heads (GQA), MLP 28672.
#   q, o: 2 x 8192 x 8192 = 134,217,728; k, v: 2 x 8192 x (8 x 128) = 16,777,216
#   SwiGLU: 3 x 8192 x 28672 = 704,643,072; norms 2 x 8192 = 16,384
#   one layer = 855,654,400; x 80 = 68,452,352,000
#   embed_tokens + lm_head: 2 x 32000 x 8192 = 524,288,000; final norm 8,192
#   total 68,976,648,192 parameters; fp16: 137,953,296,384 bytes
# KV cache per token (fp16): 2 x 80 layers x 8 KV heads x 128 x 2 bytes = 327,680 bytes
#   (with 64 KV heads it would be 8x that: 2,621,440)
LLAMA_2_70B_BYTES = 137_953_296_384
LLAMA_2_70B_KV_TOKEN = 327_680
LLAMA_2_70B_LAYER = 855_654_400


@pytest.mark.parametrize("name,total,kv_token,layer", [
    ("llama-2-7b", LLAMA_2_7B_BYTES, LLAMA_2_7B_KV_TOKEN, LLAMA_2_7B_LAYER),
    ("llama-2-70b", LLAMA_2_70B_BYTES, LLAMA_2_70B_KV_TOKEN, LLAMA_2_70B_LAYER),
])
def test_config_sizes_worked_by_hand(name, total, kv_token, layer):
    c = get_model_config(name)
    assert c.layer_params() == layer
    assert c.model_bytes() == total
    assert c.cache_bytes(1, 1) == kv_token
    assert c.cache_bytes(8, 1024) == 8 * 1024 * kv_token
    assert c.hidden_bytes(4, 512) == 4 * 512 * c.hidden_size * 2


def test_cost_model_sizes_per_kv_head_and_swiglu():
    """Per layer and token: the cache holds K and V of the KV heads only; a token's matmul flops
    are 2 per parameter of the layer (SwiGLU's three matrices, GQA's narrow k and v)."""
    c = get_model_config("llama-2-70b")
    z = model_sizes(c, GPU)
    assert z.kv_token == 2 * 8 * 128 * 2 == LLAMA_2_70B_KV_TOKEN / 80
    assert z.flops_token == 2 * LLAMA_2_70B_LAYER
    # untied: the output embedding is lm_head, so the stored weights are the model's bytes
    assert z.w_total == LLAMA_2_70B_BYTES
    assert z.w_layer_fp == LLAMA_2_70B_BYTES / 80


def test_layer_tensors_follow_the_runtime_layers():
    """Execution order: embed_tokens; per layer attention (q, k, v, o, input norm) and SwiGLU
    (gate, up, down, post-attention norm); final norm and the output matrix."""
    c = get_model_config("llama-2-70b")
    tensors = layer_tensors(c, GPU)
    assert tensors[0] == ("embed", [32000 * 8192 * 2])
    assert tensors[1] == ("attention", [8192 * 8192 * 2, 1024 * 8192 * 2, 1024 * 8192 * 2,
                                        8192 * 8192 * 2, 8192 * 2])
    assert tensors[2] == ("mlp", [28672 * 8192 * 2] * 3 + [8192 * 2])
    assert tensors[-1] == ("embed", [8192 * 2, 32000 * 8192 * 2])
    assert len(tensors) == 2 + 2 * 80


def test_tied_model_loads_its_embedding_twice():
    """SmolLM2-135M ties lm_head to embed_tokens: the runtime's output layer loads its own copy,
    so the cost model counts the 49152 x 576 embedding twice beside model_bytes' once."""
    c = get_model_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (c.n_head, c.n_kv_head, c.head_dim, c.tie_word_embeddings) == (9, 3, 64, True)
    z = model_sizes(c, GPU)
    assert z.w_total == c.model_bytes() + 49152 * 576 * 2
    assert c.cache_bytes(1, 1) == 2 * 30 * 3 * 64 * 2


def test_policy_search_runs_for_the_family():
    from flexgen_repro.cost_model.hardware import load_profile
    from flexgen_repro.cost_model.search import best_policy
    result = best_policy(get_model_config("mistral-7b"), load_profile("t4-paper"), 512, 32)
    assert result.predicted_throughput > 0
