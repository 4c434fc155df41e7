"""Hand-worked cases of the cost model's prefill terms: hidden states kept on the host, and the
sublayer pairing of weight loads with compute under sep_layer and overlap.

The toy model, the round profile and the tolerance are those of test_cost_model_equations.py;
every expected number is worked here from parameter counts, bytes and the profile's rates.
"""
from __future__ import annotations

import pytest

from flexgen_repro.cost_model.predict import evaluate_policy
from tests.test_cost_model_equations import (EXACT, H, L, LAYER_PARAMS, STORED_BYTES, TOY, F, V,
                                             policy, round_profile)

S, N, B = 16, 8, 4
# the attention sublayer's matrices (q, k, v, out: 4 H^2) against the MLP's (fc1, fc2: 2 H F)
ATTN_SHARE = 4 * H * H / (4 * H * H + 2 * H * F)


def matmul_seconds(rate: float) -> float:
    """One layer's prefill matmuls for B prompts of S tokens, and its share of the last token's logits."""
    return B * (S * 2 * LAYER_PARAMS + 2 * V * H / L) / rate


def test_toy_attention_share_is_one_third():
    assert ATTN_SHARE == pytest.approx(1 / 3, rel=EXACT)


def test_hidden_states_on_the_host_add_their_copies_to_prefill_compute():
    prof = round_profile()
    on_host = evaluate_policy(TOY, policy((100, 0, 0, 100, 0, 100), B), prof, S, N)
    on_gpu = evaluate_policy(TOY, policy((100, 0, 0, 100, 100, 0), B), prof, S, N)
    # each of the two runtime layers (attention, MLP) loads its input from the host and stores
    # its output there: 2 x (B, S, H) fp16 each way, at 1 GB/s; the outputs share the device->host
    # direction with the prompt's cache stores (K and V: 2 x (B, S, H) fp16 = the same bytes),
    # which delay them by that many bytes once more
    moved = 2 * B * S * H * 2
    cache = B * S * 2 * H * 2
    copies = moved / 1e9 + moved / 1e9 + min(moved, cache) / 1e9
    compute = matmul_seconds(1e12) + B * 4 * S * S * H / 1e11
    assert on_gpu.prefill_terms["comp"] == pytest.approx(compute, rel=EXACT)
    assert on_host.prefill_terms["comp"] == pytest.approx(compute + copies, rel=EXACT)
    assert on_host.prefill_bound == "comp"
    assert on_host.prefill_time == pytest.approx(L * (compute + copies), rel=EXACT)


def test_unbalanced_sublayers_pair_each_weight_load_with_the_other_sublayers_compute():
    # weights streamed from the host at 1 GB/s; the matmul rate chosen so that a layer's compute
    # equals its weight load, and attention made free: max(load, compute) alone would give one
    # load per layer
    load = STORED_BYTES / L / 1e9
    rate = matmul_seconds(1.0) / load
    prof = round_profile(gpu_mm_prefill_flop_s=rate, gpu_bmm_prefill_flop_s=1e30)
    pred = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), B), prof, S, N)
    assert pred.prefill_terms["ctog"] == pytest.approx(load, rel=EXACT)
    assert pred.prefill_terms["comp"] == pytest.approx(load, rel=EXACT)
    # the MLP's weights (2/3) load while the attention computes (1/3), the next attention's
    # (1/3) while the MLP computes (2/3): max(2/3, 1/3) + max(1/3, 2/3) = 4/3 of a load
    mlp = (1 - ATTN_SHARE) * load + (1 - ATTN_SHARE) * load
    attn = ATTN_SHARE * load + ATTN_SHARE * load
    assert pred.prefill_terms["sub_link_mlp"] == pytest.approx(mlp, rel=EXACT)
    assert pred.prefill_terms["sub_link_attn"] == pytest.approx(attn, rel=EXACT)
    assert pred.prefill_bound == "sub_link_mlp"
    assert pred.prefill_time == pytest.approx(L * 4 / 3 * load, rel=EXACT)


def test_without_sep_layer_one_load_overlaps_one_compute():
    load = STORED_BYTES / L / 1e9
    prof = round_profile(gpu_mm_prefill_flop_s=matmul_seconds(1.0) / load, gpu_bmm_prefill_flop_s=1e30)
    pred = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), B, sep_layer=False), prof, S, N)
    assert not any(name.startswith("sub_") for name in pred.prefill_terms)
    assert pred.prefill_time == pytest.approx(L * load, rel=EXACT)


def test_disk_weights_pair_their_disk_read_with_the_other_sublayers_compute():
    # weights on disk: read at 1 GB/s, then over the link at 1 GB/s; compute free
    prof = round_profile(gpu_mm_prefill_flop_s=1e30, gpu_bmm_prefill_flop_s=1e30)
    pred = evaluate_policy(TOY, policy((0, 0, 100, 0, 100, 0), B), prof, S, N)
    read = STORED_BYTES / L / 1e9
    assert pred.prefill_terms["dtoc"] == pytest.approx(read, rel=EXACT)
    assert pred.prefill_terms["sub_disk_mlp"] == pytest.approx((1 - ATTN_SHARE) * read, rel=EXACT)
    assert pred.prefill_terms["sub_disk_attn"] == pytest.approx(ATTN_SHARE * read, rel=EXACT)
