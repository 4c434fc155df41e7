"""Hand-worked cases of the cost model's equations on a toy model and a profile of round numbers.

Every expected number below is worked from first principles (parameter counts, bytes, flops) in
the test itself, not taken from the module under test. Times are compared with rel=1e-9: the
model is arithmetic on the same quantities, so only floating-point round-off may differ.
"""
from __future__ import annotations

import dataclasses

import pytest

from flexgen_repro.config import OptConfig
from flexgen_repro.cost_model.equations import build_step_model, compression_ratio
from flexgen_repro.cost_model.hardware import GIB, HardwareProfile
from flexgen_repro.cost_model.predict import evaluate_policy
from flexgen_repro.policy import CompressionConfig, Policy

EXACT = 1e-9          # relative: same arithmetic, round-off only

# toy OPT: 2 layers, hidden 64, 2 heads, ffn 256, vocab 1000, 128 positions, fp16
L, H, F, V, POS = 2, 64, 256, 1000, 128
TOY = OptConfig(name="toy", num_hidden_layers=L, n_head=2, hidden_size=H, input_dim=H,
                ffn_embed_dim=F, max_seq_len=POS, vocab_size=V)
# one layer: q, k, v, out (4 H^2 + 4 H), fc1 and fc2 (2 H F + F + H), two layer norms (4 H)
LAYER_PARAMS = 4 * H * H + 4 * H + 2 * H * F + F + H + 4 * H
MODEL_BYTES = 2 * (L * LAYER_PARAMS + V * H + (POS + 2) * H + 2 * H)
# the runtime stores (and loads) the token embedding twice: the output embedding has its own copy
STORED_BYTES = MODEL_BYTES + 2 * V * H


def round_profile(**changes) -> HardwareProfile:
    """Every link 1 GB/s, GPU matmul 1 TFLOP/s, batched matmul 0.1, CPU 0.01; memory plentiful."""
    base = dict(
        name="round", gpu_mem_bytes=64 * GIB, cpu_mem_bytes=64 * GIB, disk_mem_bytes=64 * GIB,
        cpu_to_gpu_bytes_s=1e9, cpu_to_gpu_pageable_bytes_s=1e9, gpu_to_cpu_cache_bytes_s=1e9,
        gpu_to_cpu_hidden_bytes_s=1e9, disk_to_cpu_bytes_s=1e9, cpu_to_disk_cache_bytes_s=1e9,
        cpu_to_disk_bytes_s=1e9, gpu_mem_bw_bytes_s=1e18, gpu_mm_prefill_flop_s=1e12,
        gpu_mm_decode_flop_s=1e12, gpu_bmm_prefill_flop_s=1e11, gpu_bmm_decode_flop_s=1e11,
        cpu_attention_flop_s=1e10, gpu_dequant_bytes_s=1e11, gpu_graph_step_overhead_s=0.0)
    base.update(changes)
    return HardwareProfile(**base)


def policy(pct, b=4, k=1, **switches) -> Policy:
    return Policy(gpu_batch_size=b, num_gpu_batches=k, w_gpu_percent=pct[0], w_cpu_percent=pct[1],
                  cache_gpu_percent=pct[2], cache_cpu_percent=pct[3], act_gpu_percent=pct[4],
                  act_cpu_percent=pct[5], **switches)


def test_toy_byte_count_matches_the_config():
    assert TOY.layer_params() == LAYER_PARAMS
    assert TOY.model_bytes() == MODEL_BYTES


def test_all_on_gpu_is_compute_bound_at_the_profiles_rates():
    s, n, b, k = 16, 8, 4, 2
    pred = evaluate_policy(TOY, policy((100, 0, 100, 0, 100, 0), b, k), round_profile(), s, n)
    B = b * k
    # prefill: every prompt token through every layer, logits of the last token, causal attention
    # counted in full (QK^T and AV: 4 s^2 H flops per sequence per layer)
    prefill = B * (L * s * 2 * LAYER_PARAMS + 2 * V * H) / 1e12 + L * B * 4 * s * s * H / 1e11
    # decode: one token per sequence; everything on the GPU, so the runtime replays CUDA graphs,
    # which attend over the whole cache buffer (s + n positions, the unwritten ones masked)
    step = B * (L * 2 * LAYER_PARAMS + 2 * V * H) / 1e12 + L * B * 4 * (s + n) * H / 1e11
    assert pred.prefill_time == pytest.approx(prefill, rel=EXACT)
    assert pred.decode_step_time == pytest.approx(step, rel=EXACT)
    assert pred.throughput == pytest.approx(B * n / (prefill + (n - 1) * step), rel=EXACT)
    assert pred.prefill_bound == pred.decode_bound == "comp"
    for terms in (pred.prefill_terms, pred.decode_terms):
        assert all(terms[t] == 0 for t in ("ctog", "gtoc", "dtoc", "ctod"))
    assert pred.peak_memory["cpu"] == pred.peak_memory["disk"] == 0


def test_without_cuda_graphs_decode_attends_over_the_average_length():
    s, n, b = 16, 8, 4
    sparse = evaluate_policy(TOY, policy((100, 0, 100, 0, 100, 0), b, attn_sparsity=0.5),
                             round_profile(), s, n)   # sparse attention is never graph-replayed
    step = b * (L * 2 * LAYER_PARAMS + 2 * V * H) / 1e12 + L * b * 4 * (s + n / 2) * H / 1e11
    assert sparse.decode_step_time == pytest.approx(step, rel=EXACT)


def test_all_weights_on_cpu_decode_step_is_weight_bytes_over_host_to_gpu_bandwidth():
    fast = round_profile(gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18)
    pred = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1), fast, 16, 8)
    assert pred.decode_bound == "ctog"
    assert pred.decode_step_time == pytest.approx(STORED_BYTES / 1e9, rel=EXACT)
    # unpinned weights cross at the pageable rate
    slow = dataclasses.replace(fast, cpu_to_gpu_pageable_bytes_s=0.25e9)
    pred = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1, pin_weight=False), slow, 16, 8)
    assert pred.decode_step_time == pytest.approx(STORED_BYTES / 0.25e9, rel=EXACT)


def test_staged_unpinned_weights_and_pieced_copies_use_their_measured_rates():
    """Unpinned weights cross through the runtime's pinned staging blocks: at the profile's
    measured staged rate, else at the slower of the pinned link and half the host memory
    bandwidth (a host copy reads and writes each byte); with neither measured, at the pageable rate.
    Policies that copy in pieces (host activations here) cross at the measured pieced rate; a
    policy that copies weights whole (everything but the weights on the GPU) at the pinned one."""
    fast = round_profile(gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18,
                         cpu_to_gpu_pageable_bytes_s=0.25e9)
    unpinned = policy((0, 100, 100, 0, 100, 0), b=1, pin_weight=False)
    host_bw = dataclasses.replace(fast, measurements={"cpu_mem_bytes_s": 1.2e9})
    # (the link's term: the host memory's own, three passes at 1.2 GB/s, binds the step here;
    # test_host_memory_binds_where_host_bytes_pass_it_more_than_once)
    link = evaluate_policy(TOY, unpinned, host_bw, 16, 8).decode_terms["ctog"] * L
    assert link == pytest.approx(STORED_BYTES / 0.6e9, rel=EXACT)           # 1.2 / 2 < 1
    staged = dataclasses.replace(fast, measurements={"cpu_mem_bytes_s": 1.2e9, "h2d_staged": 0.8e9})
    link = evaluate_policy(TOY, unpinned, staged, 16, 8).decode_terms["ctog"] * L
    assert link == pytest.approx(STORED_BYTES / 0.8e9, rel=EXACT)
    unstaged = dataclasses.replace(staged, stages_pageable=False)            # a runtime without staging
    step = evaluate_policy(TOY, unpinned, unstaged, 16, 8).decode_step_time
    assert step == pytest.approx(STORED_BYTES / 0.25e9, rel=EXACT)
    pieces = dataclasses.replace(fast, measurements={"h2d_pieces": 0.5e9})
    whole = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1), pieces, 16, 8)
    assert whole.decode_step_time == pytest.approx(STORED_BYTES / 1e9, rel=EXACT)
    host_act = policy((0, 100, 100, 0, 0, 100), b=1)
    pieced = evaluate_policy(TOY, host_act, pieces, 16, 8).decode_terms["ctog"]
    plain = evaluate_policy(TOY, host_act, fast, 16, 8).decode_terms["ctog"]
    assert pieced == pytest.approx(2 * plain, rel=EXACT)                     # every byte at half rate


def test_disk_weights_are_read_from_disk_then_cross_to_the_gpu():
    hw = round_profile(gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18, disk_to_cpu_bytes_s=0.1e9)
    pred = evaluate_policy(TOY, policy((0, 0, 100, 0, 100, 0), b=1), hw, 16, 8)
    assert pred.decode_bound == "dtoc"
    assert pred.decode_step_time == pytest.approx(STORED_BYTES / 0.1e9, rel=EXACT)
    assert pred.decode_terms["ctog"] * L == pytest.approx(STORED_BYTES / 1e9, rel=EXACT)
    assert pred.peak_memory["disk"] == pytest.approx(STORED_BYTES, rel=EXACT)


def test_cache_on_cpu_moves_to_the_gpu_or_is_attended_on_the_cpu():
    s, n, b = 32, 8, 4
    hw = round_profile(gpu_mm_decode_flop_s=1e18)
    weights_gpu = (100, 0, 0, 100, 100, 0)
    moved = evaluate_policy(TOY, policy(weights_gpu, b), hw, s, n)
    # K and V (2 H fp16 values) of every attended token of every sequence, per layer, at 1 GB/s
    per_layer_read = b * (s + n / 2) * 2 * H * 2
    assert moved.decode_terms["ctog"] == pytest.approx(per_layer_read / 1e9, rel=EXACT)
    cpu = evaluate_policy(TOY, policy(weights_gpu, b, cpu_cache_compute=True), hw, s, n)
    # only q goes out and the attention output comes back (b H fp16 each way)
    assert cpu.decode_terms["ctog"] == pytest.approx(b * H * 2 / 1e9, rel=EXACT)
    attn_flops = b * 4 * (s + n / 2) * H
    assert cpu.decode_terms["comp"] == pytest.approx(attn_flops / 1e10, rel=EXACT)
    # new K and V entries go to their CPU home either way
    assert cpu.decode_terms["gtoc"] == pytest.approx((b * 2 * H * 2 + b * H * 2) / 1e9, rel=EXACT)


def test_compression_ratio_of_4bit_groups_of_64_in_fp16():
    # 64 values: 32 bytes of codes + fp16 scale and min (4 bytes) instead of 128 bytes
    assert compression_ratio(CompressionConfig(4, 64, 0, False), 2) == pytest.approx(36 / 128, rel=EXACT)
    hw = round_profile(gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18, gpu_dequant_bytes_s=1e18)
    plain = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1), hw, 16, 8)
    packed = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1, compress_weight=True), hw, 16, 8)
    matrices = L * (4 * H * H + 2 * H * F) + 2 * V * H + (POS + 2) * H   # embeddings are matrices
    expected = (STORED_BYTES - 2 * matrices * (1 - 36 / 128)) / 1e9
    assert packed.decode_step_time == pytest.approx(expected, rel=EXACT)
    assert packed.decode_step_time < 0.35 * plain.decode_step_time


def test_without_overlap_the_terms_add_up():
    hw = round_profile()
    x = policy((0, 100, 0, 100, 0, 100), b=2)
    on, off = (evaluate_policy(TOY, dataclasses.replace(x, overlap=o), hw, 16, 8) for o in (True, False))
    assert off.decode_step_time == pytest.approx(L * sum(on.decode_terms.values()), rel=EXACT)
    assert on.decode_step_time == pytest.approx(L * max(on.decode_terms.values()), rel=EXACT)


def test_memory_homes_follow_the_placement():
    s, n, b, k = 16, 8, 2, 3
    cache = 2 * b * k * (s + n) * H * 2 * L          # K and V of every token, every layer, fp16
    assert cache == TOY.cache_bytes(b * k, s + n)
    model = build_step_model(TOY, policy((100, 0, 100, 0, 100, 0), b, k), s, n, round_profile())
    on_disk = [0, 0, 1, 0, 0, 1, 1, 0, 0]               # weights and cache on disk, hidden on GPU
    assert model.memory["disk"](on_disk) == pytest.approx(STORED_BYTES + cache, rel=EXACT)
    all_gpu = [1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert model.memory["gpu_decode_attention"](all_gpu) > STORED_BYTES + cache
    assert model.memory["cpu_decode"](all_gpu) == 0


def test_a_limit_exceeded_is_reported_by_tier():
    tight = round_profile(gpu_mem_bytes=MODEL_BYTES / 2)
    pred = evaluate_policy(TOY, policy((100, 0, 100, 0, 100, 0)), tight, 16, 8)
    assert pred.over == ("gpu",) and not pred.feasible


def test_prompt_plus_generation_beyond_positions_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_policy(TOY, policy((100, 0, 100, 0, 100, 0)), round_profile(), 120, 16)


def test_fixed_step_overhead_is_paid_per_layer_step_and_gpu_batch():
    s, n, b, k = 16, 8, 4, 3
    pol = policy((100, 0, 0, 100, 100, 0), b, k, overlap=False)   # cache on the CPU: no CUDA graphs
    base = evaluate_policy(TOY, pol, round_profile(), s, n)
    slow = evaluate_policy(TOY, pol, round_profile(gpu_step_overhead_s=1e-3), s, n)
    # sep_layer: attention and MLP are two steps per transformer layer, plus the two embedding
    # steps, for each of the k GPU batches, at every token
    steps = k * (2 * L + 2)
    assert slow.decode_step_time - base.decode_step_time == pytest.approx(steps * 1e-3, rel=EXACT)
    assert slow.prefill_time - base.prefill_time == pytest.approx(steps * 1e-3, rel=EXACT)


def test_graph_decode_pays_the_graph_floor_per_step_and_one_driver_step_per_gpu_batch():
    s, n, b, k = 16, 8, 4, 3
    pol = policy((100, 0, 100, 0, 100, 0), b, k)
    base = evaluate_policy(TOY, pol, round_profile(), s, n)
    slow = evaluate_policy(TOY, pol, round_profile(gpu_step_overhead_s=1e-3,
                                                   gpu_graph_step_overhead_s=1e-5), s, n)
    # every layer step of every GPU batch replays at the graph floor; the driver's fixed cost is
    # paid once per GPU batch and token (fill the inputs, replay, pick), not per layer step
    extra = k * (2 * L + 2) * 1e-5 + k * 1e-3
    assert slow.decode_step_time - base.decode_step_time == pytest.approx(extra, rel=EXACT)
    assert slow.prefill_time - base.prefill_time == pytest.approx(k * (2 * L + 2) * 1e-3, rel=EXACT)
    # HBM-bound (a slow memory): each GPU batch reads every layer's (uncompressed) weights once
    hbm = round_profile(gpu_mem_bw_bytes_s=1e9, gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18)
    pred = evaluate_policy(TOY, pol, hbm, s, n)
    assert pred.decode_step_time == pytest.approx(k * MODEL_BYTES / 1e9, rel=EXACT)
    assert pred.decode_bound == "comp"


def test_fused_4bit_matmuls_read_packed_weights_at_their_measured_rate():
    """Compressed weights on the GPU with the fused kernels: decode reads the packed bytes, at
    the profile's fused-matmul rate where measured (HBM's otherwise). Memory-bound here (flops
    free), so the step is the packed bytes over the rate: a rate a quarter of HBM's takes four
    times as long. Uncompressed weights go through cuBLAS at HBM rate whatever the fused rate."""
    s, n, b, k = 16, 8, 4, 2
    hbm = round_profile(gpu_mem_bw_bytes_s=1e9, gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18,
                        gpu_fused_kernels=True)
    slow = dataclasses.replace(hbm, gpu_fused_matmul_bytes_s=0.25e9)
    packed = policy((100, 0, 100, 0, 100, 0), b, k, compress_weight=True)
    base, fused = (evaluate_policy(TOY, packed, hw, s, n) for hw in (hbm, slow))
    assert base.decode_step_time > 0
    assert fused.decode_step_time == pytest.approx(4 * base.decode_step_time, rel=EXACT)
    plain = policy((100, 0, 100, 0, 100, 0), b, k)
    assert evaluate_policy(TOY, plain, slow, s, n).decode_step_time == pytest.approx(
        k * MODEL_BYTES / 1e9, rel=EXACT)
    assert hbm.fused_matmul_bytes_s == 1e9 and slow.fused_matmul_bytes_s == 0.25e9


def test_the_fused_matmul_rate_follows_the_gpu_batch_where_measured_at_several():
    """Rates measured at batches 4 (1 GB/s) and 8 (0.25 GB/s): batch 4 reads at 1 GB/s, batch 8
    at 0.25, batch 6 (halfway) at 1 / (0.5/1 + 0.5/0.25) = 0.4 GB/s (seconds per byte halfway),
    below 4 or above 8 the end's rate. The memory-bound step (flops free) scales with it."""
    s, n, k = 16, 8, 1
    one = round_profile(gpu_mem_bw_bytes_s=1e9, gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18,
                        gpu_fused_kernels=True)
    curve = dataclasses.replace(one, gpu_fused_matmul_bytes_s=5e9,
                                gpu_fused_matmul_batches=[[4, 1e9], [8, 0.25e9]])
    assert [curve.fused_matmul_rate(b) for b in (1, 4, 6, 8, 64)] == pytest.approx(
        [1e9, 1e9, 0.4e9, 0.25e9, 0.25e9], rel=EXACT)
    assert one.fused_matmul_rate(6) == 1e9                     # none measured: the single rate
    for b, rate in ((4, 1e9), (8, 0.25e9)):
        packed = policy((100, 0, 100, 0, 100, 0), b, k, compress_weight=True)
        ref = dataclasses.replace(one, gpu_fused_matmul_bytes_s=rate)
        assert evaluate_policy(TOY, packed, curve, s, n).decode_step_time == pytest.approx(
            evaluate_policy(TOY, packed, ref, s, n).decode_step_time, rel=EXACT)
    for bad in ([[8, 1e9], [4, 1e9]], [[4, 0.0]], [[4.5, 1e9]], [4, 1e9]):
        with pytest.raises(ValueError, match="gpu_fused_matmul_batches"):
            dataclasses.replace(one, gpu_fused_matmul_batches=bad)


def test_dequantize_once_pays_one_dequantization_per_layer_then_dense_reads(monkeypatch):
    """Compressed weights streamed from the host to k GPU batches, k at least
    DEQUANTIZE_ONCE_MIN_BATCHES (policy.dequantize_once):
    a decode step dequantizes the model's 16-bit bytes once, then each batch reads them at HBM
    rate; with the rule off, each batch's fused matmul reads the packed bytes at the fused rate.
    Memory-bound (flops free, links instant), so the step is exactly that many bytes over rates.
    The dequantized layer is held on the GPU while its batches compute: a higher GPU peak. (The
    weights are unpinned: pinned, the fused case would decode through streamed-weight graphs,
    whose slots hold the packed model twice over on the GPU.)"""
    from flexgen_repro import policy as policy_module
    s, n, b, k = 16, 8, 4, 3
    hw = round_profile(gpu_mem_bw_bytes_s=1e9, gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18,
                       gpu_fused_kernels=True, gpu_fused_matmul_bytes_s=0.25e9, gpu_dequant_bytes_s=2e9,
                       cpu_to_gpu_bytes_s=1e18, cpu_to_gpu_pageable_bytes_s=1e18,
                       gpu_to_cpu_cache_bytes_s=1e18, gpu_to_cpu_hidden_bytes_s=1e18)
    pol = policy((0, 100, 100, 0, 100, 0), b, k, compress_weight=True, pin_weight=False)
    monkeypatch.setattr(policy_module, "DEQUANTIZE_ONCE_MIN_BATCHES", k)
    once = evaluate_policy(TOY, pol, hw, s, n)
    assert once.decode_step_time == pytest.approx(MODEL_BYTES / 2e9 + k * MODEL_BYTES / 1e9, rel=EXACT)
    monkeypatch.setattr(policy_module, "DEQUANTIZE_ONCE_MIN_BATCHES", k + 1)
    fused = evaluate_policy(TOY, pol, hw, s, n)
    # stored bytes: matrices (the embeddings, the token one twice) packed, vectors as they are
    matrices = L * (4 * H * H + 2 * H * F) + 2 * V * H + (POS + 2) * H
    vectors = L * (9 * H + F) + 2 * H
    packed = 2 * matrices * compression_ratio(pol.comp_weight_config, 2) + 2 * vectors
    assert fused.decode_step_time == pytest.approx(k * packed / 0.25e9, rel=EXACT)
    assert once.peak_memory["gpu"] > fused.peak_memory["gpu"]


def test_a_host_backed_gpu_never_uses_graph_decode():
    s, n, b = 16, 8, 4
    pol = policy((100, 0, 100, 0, 100, 0), b)
    hw = round_profile(host_backed_gpu=True, gpu_step_overhead_s=1e-3, gpu_graph_step_overhead_s=1.0)
    pred = evaluate_policy(TOY, pol, hw, s, n)
    step = b * (L * 2 * LAYER_PARAMS + 2 * V * H) / 1e12 + L * b * 4 * (s + n / 2) * H / 1e11
    assert pred.decode_step_time == pytest.approx(step + (2 * L + 2) * 1e-3, rel=EXACT)


def test_cpu_attention_serial_term_is_the_attention_sublayer_then_the_next_attention_weights():
    s, n, b, k = 16, 8, 4, 3
    pol = policy((0, 100, 0, 100, 100, 0), b, k, cpu_cache_compute=True)   # overlap, sep_layer
    o = 2e-3
    pred = evaluate_policy(TOY, pol, round_profile(cpu_attention_batch_overhead_s=o), s, n)
    B = b * k
    # the CPU attends for all k GPU batches over the average length (4 avg H flops per sequence),
    # each batch also waiting o on the main thread; then the attention's share of a layer's
    # weights (q, k, v, out: 4 H^2 of the 4 H^2 + 2 H F matrix parameters) crosses the link
    attention = B * 4 * (s + n / 2) * H / 1e10 + k * o
    weights = 4 * H * H / (4 * H * H + 2 * H * F) * (STORED_BYTES / L) / 1e9
    assert pred.decode_terms["cpu_attn_serial"] == pytest.approx(attention + weights, rel=EXACT)
    assert pred.decode_step_time == pytest.approx(L * max(pred.decode_terms.values()), rel=EXACT)
    # a profile without the overhead, or a schedule it does not describe, has no such term
    assert "cpu_attn_serial" not in evaluate_policy(TOY, pol, round_profile(), s, n).decode_terms
    for other in (dataclasses.replace(pol, overlap=False), dataclasses.replace(pol, sep_layer=False),
                  dataclasses.replace(pol, cpu_cache_compute=False)):
        terms = evaluate_policy(TOY, other, round_profile(cpu_attention_batch_overhead_s=o), s, n)
        assert "cpu_attn_serial" not in terms.decode_terms


def test_host_cache_steps_term_is_the_hosts_work_per_gpu_batch_whose_cache_crosses():
    """With a 4-bit cache loaded from and stored to the host each token, the host spends
    cache_step_host_s per (layer, GPU batch) queueing the step and its copies: k of them per layer,
    in full whatever share of the rows is off the GPU (a batch with 1 of its 5 rows there loads
    and stores in pieces as one with all 5 does). It is a term of its own (a max with the link and
    the GPU), which binds when the GPU batches are many and small."""
    s, n, b, k = 16, 8, 5, 3
    o = 2e-3
    hw = round_profile(cache_step_host_s=o)
    for cache_cpu in (100, 60, 20):
        pol = policy((100, 0, 100 - cache_cpu, cache_cpu, 100, 0), b, k, compress_cache=True)
        pred = evaluate_policy(TOY, pol, hw, s, n)
        assert pred.decode_terms["host_cache_steps"] == pytest.approx(k * o, rel=EXACT)
    big = evaluate_policy(TOY, pol, round_profile(cache_step_host_s=1.0), s, n)
    assert big.decode_bound == "host_cache_steps"
    assert big.decode_step_time == pytest.approx(L * k * 1.0, rel=EXACT)
    # none without the profile's figure, without compression, with CPU attention, without overlap,
    # or with the cache held on the GPU
    plain = policy((100, 0, 0, 100, 100, 0), b, k, compress_cache=True)
    for other, prof in ((plain, round_profile()),
                        (dataclasses.replace(plain, compress_cache=False), hw),
                        (dataclasses.replace(plain, cpu_cache_compute=True), hw),
                        (dataclasses.replace(plain, overlap=False), hw)):
        assert "host_cache_steps" not in evaluate_policy(TOY, other, prof, s, n).decode_terms
    held = evaluate_policy(TOY, policy((100, 0, 100, 0, 100, 0), b, k, compress_cache=True), hw, s, n)
    assert held.decode_terms.get("host_cache_steps", 0.0) == 0.0
    with pytest.raises(ValueError, match="cache_step_host_s"):
        round_profile(cache_step_host_s=-1e-3)


def test_host_memory_binds_where_host_bytes_pass_it_more_than_once():
    """Host memory at 0.5 GB/s, the link at 1 GB/s. Pinned host weights pass host memory once
    (the link's DMA reads them): 2 s a GB. Unpinned ones are staged (read, written, read again by
    the DMA): 6 s a GB, more than their link time (the staged rate, half the host memory's
    copy rate, 4 s a GB)."""
    hw = round_profile(gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18,
                       measurements={"cpu_mem_bytes_s": 0.5e9})
    pinned = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1), hw, 16, 8)
    assert pinned.decode_bound == "host_memory"
    assert pinned.decode_step_time == pytest.approx(STORED_BYTES / 0.5e9, rel=EXACT)
    unpinned = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1, pin_weight=False), hw, 16, 8)
    assert unpinned.decode_bound == "host_memory"
    assert unpinned.decode_terms["ctog"] == pytest.approx(STORED_BYTES / 0.25e9 / L, rel=EXACT)
    assert unpinned.decode_step_time == pytest.approx(3 * STORED_BYTES / 0.5e9, rel=EXACT)
    # a host cache is read by its load and written by its store: b * (s + n/2) positions, plus one
    s, n, b = 16, 8, 4
    cached = evaluate_policy(TOY, policy((100, 0, 0, 100, 100, 0), b=b), hw, s, n)
    assert cached.decode_terms["host_memory"] == pytest.approx(
        b * (s + n / 2 + 1) * 2 * H * 2 / 0.5e9, rel=EXACT)
    # none without overlap (the terms add up there), without the measurement, or all on the GPU
    serial = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1, overlap=False), hw, 16, 8)
    assert "host_memory" not in serial.decode_terms
    assert "host_memory" not in evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1),
                                                round_profile(), 16, 8).decode_terms
    gpu = evaluate_policy(TOY, policy((100, 0, 100, 0, 100, 0), b=1), hw, 16, 8)
    assert gpu.decode_terms.get("host_memory", 0.0) == 0.0


def test_cpu_attention_batch_overhead_must_not_be_negative():
    with pytest.raises(ValueError, match="cpu_attention_batch_overhead_s"):
        round_profile(cpu_attention_batch_overhead_s=-1e-3)


def test_a_disk_tier_that_fits_the_page_cache_moves_at_its_rates():
    # drive 0.1 GB/s, page cache 0.5 GB/s read and 0.25 GB/s write (mapped files, as the runtime
    # keeps a disk tier that fits in PAGE_CACHE_SHARE of the host memory the CPU tier leaves)
    hw = round_profile(gpu_mm_decode_flop_s=1e18, gpu_bmm_decode_flop_s=1e18, disk_to_cpu_bytes_s=0.1e9,
                       page_cache_read_bytes_s=0.5e9, page_cache_write_bytes_s=0.25e9)
    # weights on disk cross to the GPU straight out of their registered mappings: at the link's
    # 1 GB/s, with no read out of the page cache first
    pred = evaluate_policy(TOY, policy((0, 0, 100, 0, 100, 0), b=1), hw, 16, 8)
    assert pred.page_cache and pred.decode_bound == "ctog" and pred.decode_terms["dtoc"] == 0
    assert pred.decode_step_time == pytest.approx(STORED_BYTES / 1e9, rel=EXACT)
    assert pred.prefill_terms["dtoc"] == 0 and "sub_disk_mlp" not in pred.prefill_terms
    # where profile-hardware measured that copy (page-cache pages registered with CUDA) below the
    # link's rate, at the measured 0.5 GB/s: twice the time; a measurement above the link's rate
    # changes nothing
    for mapped, rate in ((0.5e9, 0.5e9), (2e9, 1e9)):
        slow = dataclasses.replace(hw, measurements={"h2d_mapped": mapped})
        got = evaluate_policy(TOY, policy((0, 0, 100, 0, 100, 0), b=1), slow, 16, 8)
        assert got.page_cache and got.decode_step_time == pytest.approx(STORED_BYTES / rate, rel=EXACT)
    # weights in host memory are not mapped: the measurement does not touch them
    host = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), b=1),
                           dataclasses.replace(hw, measurements={"h2d_mapped": 0.5e9}), 16, 8)
    assert host.decode_step_time == pytest.approx(STORED_BYTES / 1e9, rel=EXACT)
    # a cache on disk attended on the GPU is read out of the page cache at its 0.5 GB/s
    s, n, b = 16, 8, 4
    read = evaluate_policy(TOY, policy((100, 0, 0, 0, 100, 0), b=b), hw, s, n)
    assert read.page_cache
    assert read.decode_terms["dtoc"] == pytest.approx(b * (s + n / 2) * 2 * H * 2 / 0.5e9, rel=EXACT)
    # the same disk tier beyond the share (host memory of 1.5x the weights: half of it holds
    # less than the disk tier plus the CPU tier's staging) streams from the drive
    small = dataclasses.replace(hw, cpu_mem_bytes=1.5 * STORED_BYTES)
    drive = evaluate_policy(TOY, policy((0, 0, 100, 0, 100, 0), b=1), small, 16, 8)
    assert not drive.page_cache and drive.decode_step_time == pytest.approx(STORED_BYTES / 0.1e9, rel=EXACT)
    # prefill writes the new cache into the mapped files at the page cache's write rate
    s, b = 16, 2
    cached = evaluate_policy(TOY, policy((100, 0, 0, 0, 100, 0), b=b), hw, s, 8)
    assert cached.page_cache
    assert cached.prefill_terms["ctod"] == pytest.approx(b * s * 2 * H * 2 / 0.25e9, rel=EXACT)


def test_cpu_attention_reads_a_cache_in_the_page_cache_in_place():
    s, n, b = 32, 8, 4
    hw = round_profile(gpu_mm_decode_flop_s=1e18, disk_to_cpu_bytes_s=0.1e9,
                       page_cache_read_bytes_s=2e9, page_cache_write_bytes_s=0.5e9)
    cache_disk = policy((100, 0, 0, 0, 100, 0), b, cpu_cache_compute=True)
    in_place = evaluate_policy(TOY, cache_disk, hw, s, n)
    # nothing is read off the disk tier as a transfer: the CPU attends over the mapping
    assert in_place.page_cache and in_place.decode_terms["dtoc"] == 0
    assert in_place.decode_terms["comp"] == pytest.approx(b * 4 * (s + n / 2) * H / 1e10, rel=EXACT)
    # new K and V go to the mapped files at the page cache's write rate
    assert in_place.decode_terms["ctod"] == pytest.approx(b * 2 * H * 2 / 0.5e9, rel=EXACT)
    # without page-cache rates the attended cache is read from the drive first
    drive = evaluate_policy(TOY, cache_disk, dataclasses.replace(
        hw, page_cache_read_bytes_s=0.0, page_cache_write_bytes_s=0.0), s, n)
    assert not drive.page_cache
    assert drive.decode_terms["dtoc"] == pytest.approx(b * (s + n / 2) * 2 * H * 2 / 0.1e9, rel=EXACT)


def test_page_cache_constraints_hold_the_disk_tier_within_its_share_of_free_host_memory():
    from flexgen_repro.devices.disk_io import PAGE_CACHE_SHARE
    hw = round_profile(page_cache_read_bytes_s=2e9, page_cache_write_bytes_s=0.5e9)
    model = build_step_model(TOY, policy((0, 50, 100, 0, 100, 0)), 16, 8, hw, page_cache=True)
    x = [0, 0.5, 0.5, 1, 0, 0, 1, 0, 0]
    for phase in ("prefill", "decode"):
        term = model.memory[f"page-cache_{phase}"]
        expected = model.memory["disk"](x) + PAGE_CACHE_SHARE * model.memory[f"cpu_{phase}"](x)
        assert term(x) == pytest.approx(expected, rel=EXACT)
        assert model.capacity[f"page-cache_{phase}"] == PAGE_CACHE_SHARE * hw.cpu_mem_bytes
    assert model.page_cache_fits(x)
    with pytest.raises(ValueError, match="no page-cache rates"):
        build_step_model(TOY, policy((0, 50, 100, 0, 100, 0)), 16, 8, round_profile(), page_cache=True)
    with pytest.raises(ValueError, match="page_cache_read_bytes_s must be a number >= 0"):
        round_profile(page_cache_read_bytes_s=-1.0)


def test_the_search_weighs_a_cache_split_at_the_whole_host_charge():
    """The host cache steps are a fixed charge: a placement with any cache row off the GPU pays all
    of it, one with the cache held there none. On a GPU that cannot hold everything, the relaxed
    search then keeps the cache whole on the GPU and moves weights, which a charge scaled by the
    cache's share off the GPU would not (moving a few rows of cache would look nearly free)."""
    from flexgen_repro.cost_model.predict import tier_peaks
    from flexgen_repro.cost_model.search import solve_placement
    s, n, b, k = 16, 8, 4, 1
    shape = policy((100, 0, 100, 0, 100, 0), b, k, compress_cache=True)
    charge = 1e-3      # a layer's weights cross the 1 GB/s link in STORED_BYTES / L / 1e9 ~ 0.1 ms
    hw = round_profile(cache_step_host_s=charge)
    everything = build_step_model(TOY, shape, s, n, hw)
    gpu_peak = tier_peaks(everything, everything.placement((100, 0, 100, 0, 100, 0)))[0]["gpu"]
    # a GPU a tenth of the weights short of holding everything
    short = dataclasses.replace(hw, gpu_mem_bytes=gpu_peak - 0.1 * STORED_BYTES)
    model = build_step_model(TOY, shape, s, n, short)
    x, seconds = solve_placement(model)
    assert x[3] == pytest.approx(1.0) and x[0] < 0.5        # the cache stays, weights move
    # without the charge the same GPU sends the cache to the host instead
    free, _ = solve_placement(build_step_model(TOY, shape, s, n,
                                               dataclasses.replace(short, cache_step_host_s=0.0)))
    assert free[3] < 0.5
    assert "host_cache_steps" not in model.terms("decode", x)
    split = x.copy()
    split[[3, 4]] = [0.99, 0.01]
    assert model.terms("decode", split)["host_cache_steps"](split) == pytest.approx(k * charge, rel=EXACT)
    # overlapped, the charge binds every decode step of the split: n - 1 tokens x L layers x k
    assert model.total_time(split)[1] == pytest.approx((n - 1) * L * k * charge, rel=EXACT)
    assert sum(model.total_time(split)) > 3 * seconds


def test_streamed_weight_graphs_pay_the_graph_floor_and_the_link():
    """All weights in pinned host memory, cache and activations on the GPU: decode replays one
    graph per (layer, GPU batch) over weight slots (graph_stream.py), so a step costs the graph
    floor rather than launches, as all-GPU graphs do; the weights still cross the link each
    token. Unpinned weights decode through launches."""
    s, n, b, k = 16, 8, 4, 3
    free_link = dict(cpu_to_gpu_bytes_s=1e18, cpu_to_gpu_pageable_bytes_s=1e18)
    pol = policy((0, 100, 100, 0, 100, 0), b, k)
    base = evaluate_policy(TOY, pol, round_profile(**free_link), s, n)
    slow = evaluate_policy(TOY, pol, round_profile(gpu_step_overhead_s=1e-3,
                                                   gpu_graph_step_overhead_s=1e-5, **free_link), s, n)
    extra = k * (2 * L + 2) * 1e-5 + k * 1e-3
    assert slow.decode_step_time - base.decode_step_time == pytest.approx(extra, rel=EXACT)
    unpinned = policy((0, 100, 100, 0, 100, 0), b, k, pin_weight=False)
    eager = [evaluate_policy(TOY, unpinned, round_profile(gpu_step_overhead_s=o, **free_link), s, n)
             for o in (0.0, 1e-3)]
    assert eager[1].decode_step_time - eager[0].decode_step_time == pytest.approx(
        k * (2 * L + 2) * 1e-3, rel=EXACT)
    linked = evaluate_policy(TOY, pol, round_profile(gpu_mm_decode_flop_s=1e18,
                                                     gpu_bmm_decode_flop_s=1e18), s, n)
    assert linked.decode_bound == "ctog"
    assert linked.decode_step_time == pytest.approx(STORED_BYTES / 1e9, rel=EXACT)


def test_streamed_weight_slots_hold_two_of_each_kind_of_layer_on_the_gpu():
    """The slots: two of each transformer sublayer, one of each embedding, every tensor rounded
    up to 512 bytes. Attention: two layer-norm vectors, four H x H matrices and four biases;
    MLP: two layer-norm vectors, fc1 and fc2 (H x F) and their biases; input embedding: the
    token and position tables; output embedding: a layer norm and its own token table."""
    def up(nbytes):
        return -(-nbytes // 512) * 512
    attn = 2 * up(2 * H) + 4 * up(2 * H * H) + 4 * up(2 * H)
    mlp = 2 * up(2 * H) + 2 * up(2 * H * F) + up(2 * F) + up(2 * H)
    embed_in, embed_out = up(2 * V * H) + up(2 * (POS + 2) * H), 2 * up(2 * H) + up(2 * V * H)
    slots = 2 * attn + 2 * mlp + embed_in + embed_out
    assert slots == 480768
    s, n = 16, 8
    model = build_step_model(TOY, policy((0, 100, 100, 0, 100, 0)), s, n, round_profile())
    assert model.slot_bytes == slots and model.graph_streamed
    held = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0)), round_profile(), s, n)
    eager = evaluate_policy(TOY, policy((0, 100, 100, 0, 100, 0), pin_weight=False),
                            round_profile(), s, n)
    assert held.peak_memory["gpu"] - eager.peak_memory["gpu"] == pytest.approx(slots, rel=EXACT)


def test_the_search_offers_streamed_weight_graphs_where_the_weights_do_not_fit():
    """A GPU that holds the cache and the weight slots but not the weights (an 8-layer toy, so two
    slots per kind are a quarter of its layers): where launches are dear, the search picks the
    weights all on the host, decoded through graphs, at the graphs' time."""
    from flexgen_repro.cost_model.equations import ALL_ON_GPU, STREAMED
    from flexgen_repro.cost_model.predict import tier_peaks
    from flexgen_repro.cost_model.search import SearchSpace, best_policy
    s, n, b, k = 16, 8, 4, 2
    deep = dataclasses.replace(TOY, num_hidden_layers=8, vocab_size=100)
    hw = round_profile(gpu_step_overhead_s=1e-3, gpu_graph_step_overhead_s=1e-6)
    model = build_step_model(deep, policy((0, 100, 100, 0, 100, 0), b, k), s, n, hw)
    streamed_peak = tier_peaks(model, STREAMED)[0]["gpu"]
    spare = tier_peaks(model, ALL_ON_GPU)[0]["gpu"] - streamed_peak   # the weights less the slots
    assert spare > 0
    hw = dataclasses.replace(hw, gpu_mem_bytes=streamed_peak + spare / 2)
    space = SearchSpace(gpu_batch_sizes=(b,), num_gpu_batches=(k,))
    found = best_policy(deep, hw, s, n, space=space)
    pct = found.policy
    assert (pct.w_gpu_percent, pct.w_cpu_percent, pct.cache_gpu_percent, pct.act_gpu_percent) == \
        (0, 100, 100, 100)
    assert found.predicted_throughput == pytest.approx(
        evaluate_policy(deep, pct, hw, s, n).throughput, rel=EXACT)
    eager = evaluate_policy(deep, dataclasses.replace(pct, pin_weight=False), hw, s, n)
    assert found.predicted_throughput > 1.5 * eager.throughput
