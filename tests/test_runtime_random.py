"""Random tiny OPT shapes x random policies (fractional percentages, any tier mix, every switch)
against transformers' greedy generate at float32: token-identical, seeded so failures replay."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

from conftest import hf_greedy, make_hf_opt, random_prompts, save_weight_folder
from flexgen_repro import ExecutionEnv, OptLM, Policy, get_opt_config


def _split(rng: random.Random) -> tuple[float, float]:
    gpu = rng.choice([0, 0, 100, 100, 25, 33.3, 50, 70])
    return gpu, rng.choice([0, 100 - gpu, (100 - gpu) / 2])


@pytest.mark.parametrize("seed", range(12))
def test_random_shape_and_policy_match_transformers(seed, tmp_path):
    rng = random.Random(seed)
    heads, head_dim = rng.choice([1, 2, 3, 4]), rng.choice([4, 8, 16])
    hidden = heads * head_dim
    model = make_hf_opt(hidden=hidden, layers=rng.choice([1, 2, 3]), heads=heads,
                        ffn=rng.choice([hidden, 2 * hidden, 3 * hidden + 4]),
                        vocab=rng.choice([50, 128, 200]), seed=seed)
    ckpt = os.path.join(tmp_path, "hf", f"rand{seed}")
    model.save_pretrained(ckpt)
    save_weight_folder(model, os.path.join(tmp_path, "w"), f"rand{seed}")
    config = get_opt_config(ckpt, dtype=np.float32)
    n, plen, gen = rng.randint(1, 9), rng.randint(1, 12), rng.randint(1, 6)
    prompts = random_prompts(n, plen, config.vocab_size, seed=seed,
                             pad_rows=rng.randint(0, n) if plen > 1 else 0)
    (wg, wc), (cg, cc), (ag, ac) = _split(rng), _split(rng), _split(rng)
    policy = Policy(gpu_batch_size=rng.randint(1, 4), num_gpu_batches=rng.randint(1, 3),
                    w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc,
                    act_gpu_percent=ag, act_cpu_percent=ac, overlap=rng.random() < 0.5,
                    sep_layer=rng.random() < 0.5, pin_weight=rng.random() < 0.5,
                    cpu_cache_compute=rng.random() < 0.5)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        out = OptLM(config, env, os.path.join(tmp_path, "w"), policy).generate(prompts, max_new_tokens=gen)
    np.testing.assert_array_equal(out, hf_greedy(model, prompts, gen), err_msg=str(policy))
