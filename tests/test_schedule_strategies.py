"""The block driver's strategies: which ordering each policy gets, the exact order of the steps
each queues (hand-worked for a 3-layer model, two GPU batches), Algorithm 1's loop over them, and
token-identical greedy output against transformers for every ordering and runtime option."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import hf_greedy, random_prompts
from flexgen_repro import ExecutionEnv, OptLM, Policy, get_opt_config, trace
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.schedule import (NoOverlap, OverlapBatches, OverlapOneBatch,
                                    generate_block, layer_strategy)

GEN = 5


def policy(overlap: bool, k: int, pct=(0, 100, 0, 100, 100, 0), **kw) -> Policy:
    return Policy(gpu_batch_size=2, num_gpu_batches=k, w_gpu_percent=pct[0], w_cpu_percent=pct[1],
                  cache_gpu_percent=pct[2], cache_cpu_percent=pct[3], act_gpu_percent=pct[4],
                  act_cpu_percent=pct[5], overlap=overlap, **kw)


class Recorder:
    """Stands in for a block: records each step as (name, args); layers 0 and 2 have no cache."""

    def __init__(self, K: int, gen_len: int = 3, stop_after: int | None = None):
        self.layers = [SimpleNamespace(has_cache=c) for c in (False, True, False)]
        self.K, self.gen_len, self.calls = K, gen_len, []
        self.prefetch_layers = 1
        self.live_batches = list(range(K))  # GPU batches still generating: all of them here
        self.stop_after, self.output_ids = stop_after, np.zeros(1)
        self.decode_torch_threads = None   # torch's thread count left as it is
        self.graphed_decode = False        # decode runs the strategy's steps, not graphs

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))

    def start_token(self, i):
        self.calls.append(("start_token", (i,)))
        return 0.0

    def end_token(self, i, t0):
        self.calls.append(("end_token", (i,)))
        return self.stop_after is not None and i >= self.stop_after


def test_each_policy_gets_its_ordering():
    assert isinstance(layer_strategy(policy(False, 1)), NoOverlap)
    assert isinstance(layer_strategy(policy(False, 3)), NoOverlap)
    assert isinstance(layer_strategy(policy(True, 1)), OverlapOneBatch)
    assert isinstance(layer_strategy(policy(True, 3)), OverlapBatches)


def test_deep_prefetch_loads_two_layers_ahead_wrapping_to_the_next_token():
    run = Recorder(K=1)
    run.prefetch_layers = 2
    OverlapOneBatch().step(run, 1, 1, 0)
    assert [c for c in run.calls if c[0] == "load_weight"] == [
        ("load_weight", (1,)), ("load_weight", (2,)), ("load_weight", (0,))]


def test_prefetch_stops_at_the_last_layer_where_graphs_load_decode_weights():
    run = Recorder(K=1)
    run.prefetch_layers, run.graphed_decode = 2, True
    OverlapOneBatch().step(run, 0, 1, 0)
    assert [c for c in run.calls if c[0] == "load_weight"] == [
        ("load_weight", (1,)), ("load_weight", (2,))]


def test_prefetch_depth_follows_the_policy_and_layer_size():
    """Two layers ahead only with whole copies (no CPU attention, activations on the GPU), the cache
    on the GPU and layers of at most 256 MiB; the cost model counts the same window."""
    from flexgen_repro.cost_model.equations import weights_in_flight
    from flexgen_repro.policy import Policy, prefetch_layers
    streamed = Policy(gpu_batch_size=16, num_gpu_batches=1, w_gpu_percent=0, w_cpu_percent=100,
                      cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100,
                      act_cpu_percent=0)
    host_cache = Policy(gpu_batch_size=16, num_gpu_batches=1, w_gpu_percent=0, w_cpu_percent=100,
                        cache_gpu_percent=0, cache_cpu_percent=100, act_gpu_percent=100,
                        act_cpu_percent=0)
    assert prefetch_layers(streamed, 100 << 20) == 2 and prefetch_layers(streamed, 300 << 20) == 1
    assert prefetch_layers(host_cache, 100 << 20) == 1
    layers = [("a", 1.0), ("b", 2.0), ("c", 4.0)]
    assert weights_in_flight(layers, True, 2) == {"a": 7.0, "b": 7.0, "c": 7.0}
    assert weights_in_flight(layers, True, 1) == {"a": 3.0, "b": 6.0, "c": 5.0}
    assert weights_in_flight(layers, False, 2) == {"a": 1.0, "b": 2.0, "c": 4.0}


def test_no_overlap_loads_then_computes():
    run = Recorder(K=2)
    NoOverlap().step(run, 1, 1, 0)
    assert run.calls == [("load_weight", (1,)), ("load_cache", (1, 1, 0)), ("compute", (1, 1, 0))]


def test_overlap_one_batch_loads_the_next_layer_while_this_one_computes():
    run = Recorder(K=1)
    OverlapOneBatch().step(run, 1, 1, 0)
    assert run.calls == [("load_weight", (1,)), ("load_cache", (1, 1, 0)), ("load_weight", (2,)),
                         ("load_cache", (1, 2, 0)), ("compute", (1, 1, 0))]
    run.calls.clear()
    OverlapOneBatch().step(run, 1, 2, 0)   # the last layer: the next token's first weights
    assert run.calls == [("load_weight", (2,)), ("load_cache", (1, 2, 0)), ("load_weight", (0,)),
                         ("compute", (1, 2, 0))]
    run.calls.clear()
    OverlapOneBatch().step(run, 2, 2, 0)   # the last layer of the last token: nothing ahead
    assert run.calls == [("load_weight", (2,)), ("load_cache", (2, 2, 0)), ("compute", (2, 2, 0))]


def test_overlap_batches_share_one_weight_load_and_load_the_next_batchs_cache():
    run = Recorder(K=2)
    OverlapBatches().step(run, 1, 1, 0)
    assert run.calls == [("load_weight", (1,)), ("load_cache", (1, 1, 0)), ("load_weight", (2,)),
                         ("load_cache", (1, 1, 1)), ("compute", (1, 1, 0))]
    run.calls.clear()
    OverlapBatches().step(run, 1, 1, 1)    # batch 1: no weight prefetch; the next layer's batch 0
    assert run.calls == [("load_weight", (1,)), ("load_cache", (1, 1, 1)),
                         ("load_cache", (1, 2, 0)), ("compute", (1, 1, 1))]


def test_algorithm_1_visits_token_layer_batch_in_order_and_stops_when_told():
    run = Recorder(K=2, gen_len=3, stop_after=1)
    generate_block(run, NoOverlap(), None)
    computes = [args for name, args in run.calls if name == "compute"]
    assert computes == [(i, j, k) for i in range(2) for j in range(3) for k in range(2)]
    assert [n for n, _ in run.calls if n in ("start_token", "end_token", "drain")] == \
        ["start_token", "end_token"] * 2 + ["drain"]


def test_decode_runs_torch_on_the_blocks_decode_threads_and_restores_them():
    """Prefill keeps torch's thread count; decode (tokens 1..) runs on decode_torch_threads; the
    count comes back after the block, and after a failing step too."""
    saved = torch.get_num_threads()
    seen = []

    class Counting:
        def step(self, run, i, j, k):
            seen.append((i, torch.get_num_threads()))
            if run.fail_at == i:
                raise RuntimeError("step failed")

    run = Recorder(K=1, gen_len=3)
    run.decode_torch_threads, run.fail_at = 1, None
    generate_block(run, Counting(), None)
    assert {i: n for i, n in seen} == {0: saved, 1: 1, 2: 1}
    assert torch.get_num_threads() == saved
    run = Recorder(K=1, gen_len=3)
    run.decode_torch_threads, run.fail_at = 1, 2
    with pytest.raises(RuntimeError, match="step failed"):
        generate_block(run, Counting(), None)
    assert torch.get_num_threads() == saved


def test_decode_threads_only_where_the_c_kernel_attends_beside_a_gpu(monkeypatch):
    """The kernel's team size is fixed before torch's count drops (its default follows torch's);
    nothing changes without CUDA, without CPU attention, or without the kernel."""
    from flexgen_repro.kernels import cpu_attention
    from flexgen_repro.schedule.steps import decode_threads
    monkeypatch.setattr(cpu_attention, "library", lambda: object())   # built
    monkeypatch.setattr(cpu_attention, "_cores", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    gpu, cpu = SimpleNamespace(has_cuda=True), SimpleNamespace(has_cuda=False)
    attends = policy(True, 1, pct=(100, 0, 0, 100, 100, 0), cpu_cache_compute=True)
    options = RuntimeOptions()
    decoding, threads = decode_threads(options, attends, gpu)
    assert threads == cpu_attention.RESERVED_CORES == 4
    assert decoding.cpu_attention_threads == 12 and decoding.cuda_graphs == options.cuda_graphs
    assert decode_threads(RuntimeOptions(cpu_attention_threads=6), attends, gpu)[0] \
        .cpu_attention_threads == 6                                        # the user's size stays
    assert decode_threads(options, attends, cpu) == (options, None)
    assert decode_threads(options, policy(True, 1), gpu) == (options, None)
    assert decode_threads(RuntimeOptions(cpu_attention_kernel=False), attends, gpu)[1] is None
    host_weights = policy(True, 1, pct=(0, 100, 0, 100, 100, 0), cpu_cache_compute=True)
    assert decode_threads(options, host_weights, gpu)[1] == 4                 # pinned: DMA
    assert decode_threads(options, dataclasses.replace(host_weights, pin_weight=False),
                          gpu) == (options, None)                          # staged by torch
    disk_weights = policy(True, 1, pct=(50, 0, 0, 100, 100, 0), cpu_cache_compute=True)
    assert decode_threads(options, disk_weights, gpu) == (options, None)    # read by torch
    monkeypatch.setattr(cpu_attention, "library", lambda: None)           # no compiler
    assert decode_threads(options, attends, gpu) == (options, None)


@pytest.fixture(scope="module")
def setup(tiny_opt):
    model, ckpt, weights = tiny_opt
    config = get_opt_config(ckpt, dtype=np.float32)
    prompts = random_prompts(6, 7, config.vocab_size, seed=3, pad_rows=3)
    return config, weights, prompts, hf_greedy(model, prompts, GEN)


@pytest.mark.parametrize("overlap,k", [(False, 1), (False, 2), (True, 1), (True, 2), (True, 3)])
@pytest.mark.parametrize("cpu_attention", [False, True])
def test_every_ordering_is_token_identical_to_transformers(setup, tmp_path, overlap, k, cpu_attention):
    config, weights, prompts, expected = setup
    pol = policy(overlap, k, pct=(0, 60, 0, 100, 0, 100), cpu_cache_compute=cpu_attention)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        out = OptLM(config, env, weights, pol).generate(prompts, max_new_tokens=GEN)
    np.testing.assert_array_equal(out, expected)


def test_options_come_from_the_env_unless_given(setup, tmp_path):
    config, weights, prompts, expected = setup
    mine = RuntimeOptions(cpu_attention_kernel=False, cpu_attention_threads=1)
    with ExecutionEnv.create(str(tmp_path / "offload"), options=mine) as env:
        assert OptLM(config, env, weights, policy(True, 2)).options is mine
        other = RuntimeOptions(cuda_graphs=False)
        assert OptLM(config, env, weights, policy(True, 2), other).options is other
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        assert env.options == RuntimeOptions()


@pytest.mark.parametrize("options", [
    RuntimeOptions(cpu_attention_kernel=False), RuntimeOptions(cpu_attention_threads=1),
    RuntimeOptions(cuda_graphs=False)], ids=["torch-attention", "one-thread", "no-graphs"])
def test_runtime_options_keep_tokens(setup, tmp_path, options):
    config, weights, prompts, expected = setup
    pol = policy(True, 2, pct=(0, 100, 0, 100, 100, 0), cpu_cache_compute=True)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        out = OptLM(config, env, weights, pol, options).generate(prompts, max_new_tokens=GEN)
    np.testing.assert_array_equal(out, expected)


def test_profile_prints_each_token_and_keeps_tokens(setup, tmp_path, capsys):
    config, weights, prompts, expected = setup
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, policy(True, 2), RuntimeOptions(profile=True))
        np.testing.assert_array_equal(lm.generate(prompts, max_new_tokens=GEN), expected)
    err = capsys.readouterr().err
    blocks = 2                                      # 6 prompts, 2 x 2 per block
    assert err.count("[profile] token 0:") == blocks
    assert err.count(f"[profile] token {GEN - 1}:") == blocks
    assert "decode/SelfAttention wait" in err


def test_trace_records_the_run_and_leaves_nothing_active(setup, tmp_path):
    config, weights, prompts, expected = setup
    path = tmp_path / "trace.json"
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, policy(True, 2), RuntimeOptions(trace_path=str(path)))
        np.testing.assert_array_equal(lm.generate(prompts, max_new_tokens=GEN), expected)
    assert trace.current() is None
    lm.tracer.dump()
    summary = json.loads(path.read_text())["summary"]
    assert set(summary) == {"prefill", "decode"}
    assert summary["decode"]["MainThread/SelfAttention"] > 0 and "MainThread/wait" in summary["decode"]
    assert any(name.startswith("copy-weight") for name in summary["decode"])


def test_cache_stores_in_flight_are_bounded_by_a_prefill_stores_worth_of_bytes(setup, tmp_path,
                                                                               monkeypatch):
    """Pending cache stores hold their keys and values: at most MAX_PENDING_STORES prefill stores'
    bytes of them. A decode store holds one token's, so many more than MAX_PENDING_STORES of those
    may be pending (the host is not held to a few GPU batches ahead by them); tokens unchanged."""
    from flexgen_repro.schedule import steps
    config, weights, prompts, expected = setup
    seen = []
    store = steps.BlockSteps.store_cache

    def record(run, i, j, k, kv):
        store(run, i, j, k, kv)
        seen.append((i, len(run.pending_stores), run.pending_store_bytes))
    monkeypatch.setattr(steps.BlockSteps, "store_cache", record)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, policy(True, 3, pct=(0, 100, 0, 100, 100, 0)))
        np.testing.assert_array_equal(lm.generate(prompts, max_new_tokens=GEN), expected)
    row_bytes = config.n_kv_head * config.head_dim * 2 * 4       # K and V of one position, float32
    budget = steps.MAX_PENDING_STORES * 2 * prompts.shape[1] * row_bytes   # 2 rows per GPU batch
    assert max(b for _, _, b in seen) <= budget
    assert max(n for i, n, _ in seen if i == 0) <= steps.MAX_PENDING_STORES
    assert max(n for i, n, _ in seen if i > 0) > steps.MAX_PENDING_STORES


def test_decode_cache_stores_gathered_keep_tokens(setup, tmp_path, monkeypatch):
    """A decode step's store into a host cache split with the GPU tier: its host parts go as one
    gathered copy (storage.write_to_host, once per store with both K's and V's host parts), and
    the tokens are transformers'."""
    from flexgen_repro.schedule import steps
    calls, gather = [], steps.write_to_host
    def spy(writes):
        calls.append(len(writes))
        return gather(writes)
    monkeypatch.setattr(steps, "write_to_host", spy)
    config, weights, prompts, expected = setup
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, policy(True, 2, pct=(0, 100, 50, 50, 100, 0)))
        np.testing.assert_array_equal(lm.generate(prompts, max_new_tokens=GEN), expected)
    # one gathered store per decode step of every (layer, GPU batch); K and V each have a host part
    # a decode store per (token after the first, layer, GPU batch of 2 rows: 3 over the 6 prompts)
    assert len(calls) == (GEN - 1) * config.num_hidden_layers * 3
    # K's and V's rows split 50/50 in two segments; without CUDA the GPU tier is host memory too
    segments_on_host = 1 if torch.cuda.is_available() else 2
    assert set(calls) == {2 * segments_on_host}
