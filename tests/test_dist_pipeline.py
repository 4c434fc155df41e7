"""Pipeline parallelism on the CPU with gloo: 2 and 3 ranks, 1 and 2 micro-batches, an offloading
policy on one stage, give the same greedy ids as one process (OptLM, itself token-identical to
transformers at float32). Ids are compared exactly: every stage runs the same float32 maths on
the same values as the single process, only on another process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_hf_opt, random_prompts, save_weight_folder
from dist_ranks import pipeline_rank, run_ranks
from flexgen_repro import ExecutionEnv, OptLM, Policy, get_model_config, get_opt_config
from flexgen_repro.parallel.pipeline import apply_stop
from flexgen_repro.parallel.stage import Stage, StageLM, split_stages
from flexgen_repro.parallel.world import World, world_from_env

GEN_LEN = 5


def _policy(b, k, pct=(100, 0, 100, 0, 100, 0), **kw) -> dict:
    return dict(gpu_batch_size=b, num_gpu_batches=k, w_gpu_percent=pct[0], w_cpu_percent=pct[1],
                cache_gpu_percent=pct[2], cache_cpu_percent=pct[3], act_gpu_percent=pct[4],
                act_cpu_percent=pct[5], **kw)


# weights over all three tiers, the cache half in host memory with attention there, and the
# activations in host memory: every copy path of the driver on the stage that uses it
OFFLOAD = dict(pct=(30, 40, 0, 50, 0, 100), cpu_cache_compute=True)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """A 4-layer random OPT: (checkpoint dir, weight root)."""
    root = tmp_path_factory.mktemp("tiny4")
    model = make_hf_opt(layers=4, seed=3)
    ckpt = os.path.join(root, "hf", "tiny4")
    model.save_pretrained(ckpt)
    weights = os.path.join(root, "weights")
    save_weight_folder(model, weights, "tiny4")
    return ckpt, weights


def _reference(ckpt, weights, prompts, stop=None) -> np.ndarray:
    config = get_model_config(ckpt, dtype=np.float32)
    with ExecutionEnv.create() as env:
        return OptLM(config, env, weights, Policy(**_policy(2, 1))).generate(prompts, GEN_LEN, stop=stop)


def _cases(offload_rank: int) -> list[dict]:
    """One micro-batch of 2x1 (rank 0 with attention and MLP as one layer); two micro-batches of
    2x2 (three blocks' worth of prompts, the last block short) with the offloading policy on one
    rank and receives posted ahead."""
    one = random_prompts(2, 6, 128, seed=1, pad_rows=1)
    many = random_prompts(19, 7, 128, seed=2, pad_rows=5)
    return [dict(prompts=one, micro=1, gen_len=GEN_LEN, async_comm=False,
                 policies={"default": _policy(2, 1), 0: _policy(2, 1, sep_layer=False)}),
            dict(prompts=many, micro=2, gen_len=GEN_LEN, async_comm=True,
                 policies={"default": _policy(2, 2), offload_rank: _policy(2, 2, **OFFLOAD)})]


@pytest.mark.parametrize("ranks,offload_rank", [(2, 0), (3, 1)])
def test_pipeline_matches_one_process(tiny4, ranks, offload_rank):
    ckpt, weights = tiny4
    cases = _cases(offload_rank)
    per_rank = run_ranks(pipeline_rank, ranks, ckpt, weights, cases)
    for n, case in enumerate(cases):
        expected = _reference(ckpt, weights, case["prompts"])
        for rank in range(ranks):  # every rank returns the whole output
            np.testing.assert_array_equal(per_rank[rank][n], expected, err_msg=f"case {n} rank {rank}")


def test_llama_pipeline_matches_one_process(tmp_path):
    """A grouped-query Llama over 2 ranks, 2 micro-batches, the offloading policy on rank 1."""
    from llama_models import make_hf_llama, save_and_prepare
    ckpt, weights = save_and_prepare(make_hf_llama(layers=4, kv_heads=2, seed=4), str(tmp_path), "tiny-llama")
    prompts = random_prompts(8, 6, 128, seed=6)
    case = dict(prompts=prompts, micro=2, gen_len=GEN_LEN, async_comm=True,
                policies={"default": _policy(2, 2), 1: _policy(2, 2, **OFFLOAD)})
    per_rank = run_ranks(pipeline_rank, 2, ckpt, weights, [case])
    expected = _reference(ckpt, weights, prompts)
    for rank in range(2):
        np.testing.assert_array_equal(per_rank[rank][0], expected, err_msg=f"rank {rank}")


def test_stop_after_pipeline_equals_stop_in_the_driver(tiny4):
    """apply_stop on ids generated without stopping gives what the driver's own stop gives."""
    ckpt, weights = tiny4
    prompts = random_prompts(4, 6, 128, seed=5)
    free = _reference(ckpt, weights, prompts)
    stop = int(free[0, 6 + 1])  # the token row 0 emits second: some rows stop, some may not
    out = free.copy()
    apply_stop(out, 6, GEN_LEN, stop, 1)
    np.testing.assert_array_equal(out, _reference(ckpt, weights, prompts, stop=stop))
    assert (out[0, 6 + 2:] == 1).all()


def test_split_stages_follows_the_original_rule():
    # 5 layers over 3 stages: the first two take the extra layer
    assert [(s.first_layer, s.stop_layer) for s in split_stages(5, 3)] == [(0, 2), (2, 4), (4, 5)]
    assert [(s.first_layer, s.stop_layer) for s in split_stages(4, 2)] == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="at least 3 decoder layers"):
        split_stages(2, 3)


def test_stage_layer_slices_cover_the_model_once():
    """[embed] + 2 per decoder layer (sep_layer) + [head]: the stages' slices tile 0..11."""
    stages = split_stages(5, 3)
    covered = [i for s in stages for i in range(12)[s.layer_slice(2)]]
    assert covered == list(range(12))
    assert Stage(0, 1, 0, 5).layer_slice(1) == slice(0, 7)


def test_world_from_torchrun_and_mpi_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_env() == World(3, 4, 1)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    assert world_from_env(use_mpi=True) == World(2, 8, 0)
    assert world_from_env(rank=0, size=2, local_rank=0) == World(0, 2, 0)
    with pytest.raises(ValueError, match="torchrun"):
        World(4, 4, 0)


def test_dist_flex_opt_under_torchrun(tmp_path):
    """Two ranks through torchrun: the original's log text, and a record naming each rank's
    layers and placement (the policy's split applied to each rank's own layers)."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_port()), "-m", "flexgen_repro.dist_flex_opt", "--model", "opt-tiny",
           "--path", "_DUMMY_", "--prompt-len", "8", "--gen-len", "3", "--gpu-batch-size", "2",
           "--dtype", "float32", "--percent", "50", "50", "100", "0", "100", "0",
           "--comm-device", "cpu", "--async-comm", "--json-file", str(out),
           "--log-file", str(tmp_path / "r.log"), "--offload-dir", str(tmp_path / "off")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode throughput:" in proc.stdout and "rank 1: decoder layers 1-1" in proc.stdout
    record = json.loads(out.read_text())
    assert record["world_size"] == 2 and record["num_inner_iterations"] == 2
    assert record["backend"] == "gloo"
    assert [s["decoder_layers"] for s in record["stages"]] == [[0, 1], [1, 2]]
    assert [(s["embedding"], s["output_head"]) for s in record["stages"]] == [(True, False), (False, True)]
    config = get_opt_config("opt-tiny", dtype=np.float32)
    policy = Policy(**_policy(2, 1, pct=(50, 50, 100, 0, 100, 0)))
    for rank, s in enumerate(record["stages"]):  # the policy applied to each rank's own layers
        with ExecutionEnv.create() as env:
            alone = StageLM(config, env, "_DUMMY_", policy, split_stages(2, 2)[rank], 2)
            assert s["weight_placement"] == pytest.approx(alone.weight_placement)
    assert record["num_prompts"] == 2 * 1 * 2
    assert (tmp_path / "r.log").read_text().count("total throughput") == 1


def test_dist_flex_opt_bad_flags_exit_2(capsys):
    from flexgen_repro.dist_flex_opt import main
    code = main(["--model", "opt-tiny", "--path", "_DUMMY_", "--num-inner-iterations", "0",
                 "--dtype", "float32", "--comm-device", "cpu"])
    assert code == 2
    assert "--num-inner-iterations must be >= 1" in capsys.readouterr().err


def _port() -> int:
    from dist_ranks import free_port
    return free_port()


def test_rendezvous_and_backend_choice():
    from flexgen_repro.parallel.world import backend_for, init_method
    assert init_method(None, None) is None  # torchrun's MASTER_ADDR / MASTER_PORT
    assert init_method("10.0.0.1", 7777) == "tcp://10.0.0.1:7777"
    with pytest.raises(ValueError, match="go together"):
        init_method("10.0.0.1", None)
    assert backend_for("cpu") == "gloo"
    with pytest.raises(ValueError, match="--comm-device"):
        backend_for("nvlink")
