"""Graph decode's logic on the CPU: the driver's all-GPU path (prefill, q/k/v fused as a setup
step, then every decode token queued through GraphedDecode and collected one token late), with
"graphs" that re-run the captured body eagerly instead of replaying a CUDA graph. Greedy output
must equal transformers' at float32, over two blocks (the second reuses the captures), and with
`stop` it must equal the unGraphed driver's output token for token."""
from __future__ import annotations


import numpy as np
import pytest

from conftest import check_graphed_stop, hf_greedy, random_prompts
from flexgen_repro import ExecutionEnv, OptLM, Policy, flex_opt, get_opt_config

GEN = 6


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
        assert flex_opt.decode_graphs(lm) == "all-gpu"       # as flex_opt's record says
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(again, expected)
    # two calls of 6 prompts in GPU batches of 2: 3 batches hold prompts in each call (a batch of
    # filler rows only, as in the second block with k = 2, decodes nothing)
    assert eager_graphs.replays == 2 * 3 * (GEN - 1)          # every decode token of those batches
    assert fused is not None and fused.shape[0] == 3 * config.hidden_size   # q, k, v as one buffer


def test_graphed_stop_matches_the_driver_without_graphs(setup, tmp_path, eager_graphs):
    check_graphed_stop(setup, str(tmp_path / "offload"), all_gpu(2), eager_graphs, GEN)
