"""Graph decode's logic on the CPU: the driver's all-GPU path (prefill, q/k/v fused as a setup
step, then every decode token queued through GraphedDecode and collected one token late), with
"graphs" that re-run the captured body eagerly instead of replaying a CUDA graph. Greedy output
must equal transformers' at float32, over two blocks (the second reuses the captures), and with
`stop` it must equal the unGraphed driver's output token for token."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import hf_greedy, random_prompts
from flexgen_repro import ExecutionEnv, OptLM, Policy, get_opt_config
from flexgen_repro.graph_decode import GraphedDecode
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.schedule import driver

GEN = 6


class EagerGraphs(GraphedDecode):
    """GraphedDecode whose 'graph' runs the captured body again on each replay, and whose picked
    ids reach the host by a plain copy: what a CUDA graph replays, without CUDA."""

    replays = 0

    def _record(self, k: int):
        self._body(k)                       # the warm-up run, as at capture

        def replay():
            EagerGraphs.replays += 1
            self._body(k)
        return SimpleNamespace(replay=replay)

    def _inputs(self, i: int, k: int) -> dict:
        # on the GPU the ids are copied from output_ids; on the CPU `.to(device)` would alias it,
        # and the static inputs (advanced in place) would write into the output
        return {name: t.clone() for name, t in super()._inputs(i, k).items()}

    def _to_host(self, i: int, k: int, ids):
        return ids.clone(), SimpleNamespace(synchronize=lambda: None)


@pytest.fixture
def eager_graphs(monkeypatch):
    monkeypatch.setattr(driver, "graphable", lambda policy, env, want_logits: not want_logits)
    monkeypatch.setattr(driver, "GraphedDecode", EagerGraphs)
    EagerGraphs.replays = 0


@pytest.fixture(scope="module")
def setup(tiny_opt):
    model, ckpt, weights = tiny_opt
    config = get_opt_config(ckpt, dtype=np.float32)
    prompts = random_prompts(6, 7, config.vocab_size, seed=5, pad_rows=3)
    return config, weights, prompts, hf_greedy(model, prompts, GEN)


def all_gpu(k: int) -> Policy:
    return Policy(gpu_batch_size=2, num_gpu_batches=k, w_gpu_percent=100, w_cpu_percent=0,
                  cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100,
                  act_cpu_percent=0)


@pytest.mark.parametrize("k", [1, 2])
def test_graphed_pipeline_matches_transformers(setup, tmp_path, eager_graphs, k):
    config, weights, prompts, expected = setup
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, all_gpu(k))
        out = lm.generate(prompts, max_new_tokens=GEN)
        again = lm.generate(prompts, max_new_tokens=GEN)      # captures reused across calls
        fused = lm.weight_home[1]["w_q"].data._base
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(again, expected)
    # two calls of 6 prompts in GPU batches of 2: 3 batches hold prompts in each call (a batch of
    # filler rows only, as in the second block with k = 2, decodes nothing)
    assert EagerGraphs.replays == 2 * 3 * (GEN - 1)          # every decode token of those batches
    assert fused is not None and fused.shape[0] == 3 * config.hidden_size   # q, k, v as one buffer


def test_graphed_stop_matches_the_driver_without_graphs(setup, tmp_path, eager_graphs):
    config, weights, prompts, expected = setup
    stop = int(expected[0, prompts.shape[1] + 2])            # row 0 stops at its third token
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        graphed = OptLM(config, env, weights, all_gpu(2)).generate(prompts, GEN, stop=stop)
        plain = OptLM(config, env, weights, all_gpu(2), RuntimeOptions(cuda_graphs=False)) \
            .generate(prompts, GEN, stop=stop)
    assert EagerGraphs.replays > 0
    np.testing.assert_array_equal(graphed, plain)
    assert (graphed[0, prompts.shape[1] + 3:] == config.pad_token_id).all()
