"""The cost model's GPU memory against the runtime: hand-worked peaks of a toy model, the runtime's
buffering constants and weight tensors, the placement the runtime realizes from percentages, and
the OPT-30B policy that ran out of a 16 GiB cap.

Expected bytes are worked by hand from the shapes the runtime allocates (model/layers.py,
schedule/); the model's named constants (fragmentation factor, cuBLAS workspaces) enter as
themselves. Memory is compared with rel=1e-12: the same integer arithmetic, round-off only.
"""
from __future__ import annotations

import dataclasses

import pytest

from flexgen_repro import schedule
from flexgen_repro.config import OptConfig, get_opt_config
from flexgen_repro.cost_model import equations
from flexgen_repro.cost_model.equations import (ALLOCATOR_FRAGMENTATION, CUBLAS_WORKSPACES,
                                                build_step_model)
from flexgen_repro.cost_model.hardware import GIB, load_profile
from flexgen_repro.cost_model.placement import layer_tensors
from flexgen_repro.cost_model.predict import evaluate_policy
from flexgen_repro.model import layers as runtime_layers
from flexgen_repro.model.weight_home import stored_bytes
from flexgen_repro.policy import Policy, place_weights

EXACT = 1e-12
FRAG = ALLOCATOR_FRAGMENTATION

# toy OPT: 2 layers, hidden 64, 2 heads, ffn 256, vocab 1000, 128 positions, fp16 (2 bytes)
L, H, HEADS, F, V, POS = 2, 64, 2, 256, 1000, 128
TOY = OptConfig(name="toy", num_hidden_layers=L, n_head=HEADS, hidden_size=H, input_dim=H,
                ffn_embed_dim=F, max_seq_len=POS, vocab_size=V)
# stored bytes of each runtime layer: embeddings, attention (4 H^2 + 4 biases + layer norm),
# MLP (2 H F + biases F + H + layer norm), the output embedding's layer norm and its own token table
IN_EMBED, ATTN, MLP, OUT_EMBED = 2 * (V * H + (POS + 2) * H), 2 * (4 * H * H + 6 * H), \
    2 * (2 * H * F + F + 3 * H), 2 * (2 * H + V * H)
# execution order, cyclic over tokens: in, a0, m0, a1, m1, out, in, ... With overlap the layer
# computing and the one loading ahead are on the GPU; the largest such window for each step kind:
WINDOW = {"attention": ATTN + MLP,                  # the computing layer and the one after it
          "mlp": max(MLP + ATTN, MLP + OUT_EMBED),
          "embed": max(IN_EMBED + ATTN, OUT_EMBED + IN_EMBED)}


def profile(gpu_gib: float = 64):
    return dataclasses.replace(load_profile("t4-paper"), gpu_mem_bytes=gpu_gib * GIB,
                               cpu_mem_bytes=1024 * GIB)


def policy(pct, b, k=1, **switches) -> Policy:
    return Policy(gpu_batch_size=b, num_gpu_batches=k, w_gpu_percent=pct[0], w_cpu_percent=pct[1],
                  cache_gpu_percent=pct[2], cache_cpu_percent=pct[3], act_gpu_percent=pct[4],
                  act_cpu_percent=pct[5], **switches)


def gpu_terms(pol: Policy, s: int, n: int) -> dict:
    model = build_step_model(TOY, pol, s, n, profile())
    x = model.placement(pol.percent)
    return {name: term(x) for name, term in model.memory.items() if name.startswith("gpu_")}


def test_the_model_mirrors_the_runtimes_buffering_constants():
    assert equations.MAX_PENDING_STORES == schedule.MAX_PENDING_STORES
    assert equations.MLP_CHUNK_TOKENS == runtime_layers.MLP_CHUNK_TOKENS


@pytest.mark.parametrize("sep_layer", [True, False])
@pytest.mark.parametrize("compress", [False, True])
def test_weight_tensors_are_the_runtimes(sep_layer, compress):
    # hidden 128, vocab 1024, 126 + 2 positions: every matrix splits into whole groups of 64, so
    # compressed sizes are exact too (a ragged last group is padded by the runtime, not the model)
    config = dataclasses.replace(TOY, hidden_size=128, input_dim=128, vocab_size=1024, max_seq_len=126)
    pol = policy((100, 0, 100, 0, 100, 0), 1, sep_layer=sep_layer, compress_weight=compress)
    runtime = [[stored_bytes(spec, pol, 2) for spec in layer.specs()]
               for layer in runtime_layers.build_layers(config, sep_layer)]
    model = [sizes for _, sizes in layer_tensors(config, pol)]
    assert [len(row) for row in model] == [len(row) for row in runtime]
    for got, want in zip(model, runtime):
        assert got == pytest.approx(want, rel=EXACT)


def test_weight_placement_is_realized_by_whole_tensors_as_the_runtime_places_them():
    pol = policy((50, 50, 100, 0, 100, 0), 8)
    runtime = [[stored_bytes(spec, pol, 2) for spec in layer.specs()]
               for layer in runtime_layers.build_layers(TOY, True)]
    on_gpu = sum(size for row, tiers in zip(runtime, place_weights(runtime, (50, 50, 0)))
                 for size, tier in zip(row, tiers) if tier.value == "gpu")
    model = build_step_model(TOY, pol, 16, 8, profile())
    assert model.placement(pol.percent)[0] == pytest.approx(on_gpu / sum(map(sum, runtime)), rel=EXACT)
    # OPT-6.7B at 50% recorded 51.47% of its weight bytes on the GPU on the H200
    # (results/calibration/raw/cal-6.7b-w50-8x1.json, weight_placement)
    big = get_opt_config("opt-6.7b")
    model = build_step_model(big, pol, 512, 32, profile())
    assert model.placement(pol.percent)[0] == pytest.approx(0.5147290133637572, rel=1e-9)


def test_cache_and_hidden_states_are_realized_by_whole_rows():
    model = build_step_model(TOY, policy((0, 100, 0, 100, 100, 0), 12), 16, 8, profile())
    x = model.placement((0, 100, 21, 79, 93, 7))
    # 21% of 12 rows rounds to 3 (25%); 93% to 11 rows, the CPU's 7% to the last one
    assert list(x[3:]) == pytest.approx([3 / 12, 9 / 12, 0, 11 / 12, 1 / 12, 0], abs=EXACT)


@pytest.fixture
def one_layer_ahead(monkeypatch):
    """The WINDOW above: one layer loading ahead (the toy's small layers would go two ahead under
    whole copies; policy.prefetch_layers, tested by hand in test_schedule_strategies)."""
    from flexgen_repro import policy as policy_module
    monkeypatch.setattr(policy_module, "DEEP_PREFETCH_MAX_LAYER_BYTES", 0)


def test_prefill_peak_of_each_step_kind_by_hand(one_layer_ahead):
    s, n, b, k = 16, 8, 4, 2
    terms = gpu_terms(policy((0, 100, 100, 0, 100, 0), b, k), s, n)
    hid = b * s * H * 2                                    # one GPU batch's (b, s, h) in fp16
    cache = b * k * (s + n) * 2 * H * 2 * L                # K and V, full length, every layer
    home = CUBLAS_WORKSPACES + cache + k * hid             # weights on the CPU: no weight home
    store = b * s * 2 * H * 2                              # one cache store's K and V
    # two stores in flight; the attention step's own K and V (the newest store's) are among its
    # 5 or 7 (b, s, h), so it holds one more besides them, the MLP and embedding steps two
    pending = {"attention": store, "mlp": 2 * store, "embed": 2 * store}
    # attention: 5 (b, s, h) and the bool mask with its fp16 form (3 bytes per (b, s, s)) during
    # the kernel, 7 (b, s, h) after it (merged heads, projection, residual sum)
    attention = max(5 * hid + 3 * b * s * s, 7 * hid)
    # MLP on b s = 64 tokens (one chunk): layer norm, fc1, its ReLU copy, fc2
    mlp = b * s * (2 * F + 2 * H) * 2
    # embeddings: two lookups and their sum, or the last token's logits in fp16 and float32
    embed = max(3 * hid, b * V * (2 + 4))
    for kind, step in (("attention", attention), ("mlp", mlp), ("embed", embed)):
        want = home + FRAG * (WINDOW[kind] + step + pending[kind])
        assert terms[f"gpu_prefill_{kind}"] == pytest.approx(want, rel=EXACT), kind


def test_decode_loads_whole_cache_buffers_this_step_and_next():
    s, n, b, k = 16, 8, 4, 2
    terms = gpu_terms(policy((100, 0, 0, 100, 100, 0), b, k, overlap=False), s, n)
    weights = IN_EMBED + L * (ATTN + MLP) + OUT_EMBED      # all on the GPU: nothing in flight
    home = CUBLAS_WORKSPACES + weights + k * b * H * 2     # the hidden states of one token
    buffer = b * (s + n) * 2 * H * 2                       # (b, heads, s + n, d), K and V
    scores = 18 * b * HEADS * (s + n) + 8 * b * H * 2      # one query's scores, a few (b, h)
    mlp = b * (2 * F + 2 * H) * 2
    embed = b * V * (2 + 4)
    # an attention step holds its own cache and the next batch's; an MLP or embedding step the
    # next attention's
    assert terms["gpu_decode_attention"] == pytest.approx(home + FRAG * (2 * buffer + scores), rel=EXACT)
    assert terms["gpu_decode_mlp"] == pytest.approx(home + FRAG * (buffer + mlp), rel=EXACT)
    assert terms["gpu_decode_embed"] == pytest.approx(home + FRAG * (buffer + embed), rel=EXACT)
    # CPU attention keeps the CPU's cache there
    cpu = gpu_terms(policy((100, 0, 0, 100, 100, 0), b, k, overlap=False, cpu_cache_compute=True), s, n)
    assert cpu["gpu_decode_attention"] == pytest.approx(home + FRAG * scores, rel=EXACT)


def test_without_overlap_only_the_computing_layers_weights_are_in_flight(one_layer_ahead):
    s, n, b = 16, 8, 4
    on = gpu_terms(policy((0, 100, 100, 0, 100, 0), b), s, n)
    off = gpu_terms(policy((0, 100, 100, 0, 100, 0), b, overlap=False), s, n)
    pending = b * s * 2 * H * 2        # stores run inline without overlap (one besides the step's)
    assert on["gpu_prefill_attention"] - off["gpu_prefill_attention"] == \
        pytest.approx(FRAG * (WINDOW["attention"] - ATTN + pending), rel=EXACT)
    assert on["gpu_decode_mlp"] - off["gpu_decode_mlp"] == \
        pytest.approx(FRAG * (WINDOW["mlp"] - MLP), rel=EXACT)


def test_long_prompts_run_the_mlp_in_chunks():
    b, s = 2, 3000            # 6000 tokens: chunks of 4096 // 2 = 2048 positions of 2 rows
    chunked = equations._prefill_steps(TOY, policy((100, 0, 100, 0, 100, 0), b), b, s)["mlp"]
    hid = b * s * H * 2
    # one chunk's layer norm, fc1, ReLU, fc2 on 4096 tokens, plus the chunks done and their concatenation
    assert chunked == pytest.approx(4096 * (2 * F + 2 * H) * 2 + 2 * hid, rel=EXACT)


def test_the_opt30b_policy_that_ran_out_of_16_gib_is_refused():
    """30b-auto on an H200 (calibration suite): 12 x 6, 25% of the cache on the GPU, prompt 512, 32 new
    tokens ran out of a 16 GiB cap in prefill on the H200 (of which a measured profile may use
    94%). The model now puts its peak above even the whole cap."""
    config = get_opt_config("opt-30b")
    failed = policy((0, 100, 25, 75, 100, 0), 12, 6)
    capped = dataclasses.replace(load_profile("t4-paper"), gpu_headroom=0.94).with_memory(gpu_gb=16)
    pred = evaluate_policy(config, failed, capped, 512, 32)
    assert pred.peak_memory["gpu"] > 16 * GIB
    assert "gpu" in pred.over
    # 21% of the cache on the GPU is the same 3 rows of 12: refused too
    assert evaluate_policy(config, policy((0, 100, 21, 79, 100, 0), 12, 6), capped, 512, 32).over
