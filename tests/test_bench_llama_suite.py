"""The h100-llama suite scaled down to the CPU: every case, its model swapped for llama-tiny and its
lengths shortened, runs through the command line the runner builds for it (flex_opt for ours, the
HF Accelerate baseline for `hf-` cases, in this process) and writes a record of what it ran."""
from __future__ import annotations

import dataclasses
import json

import pytest

from flexgen_repro.bench import runner, suites
from flexgen_repro.config import get_model_config

PROMPT, GEN = 16, 4


def _scaled(case: suites.Case) -> suites.Case:
    return dataclasses.replace(case, model="llama-tiny", prompt_len=PROMPT, gen_len=GEN)


def test_suite_names_llama_family_models_and_fits_the_cap():
    cases = {c.case: c for c in suites.load_suite("h100-llama")}
    assert {c.config().family for c in cases.values()} == {"llama"}
    assert {c.model for c in cases.values()} == {"llama-2-7b", "mistral-7b", "llama-2-70b"}
    assert all(c.gpu_mem_gb == 16 and c.weights == "dummy" and (c.prompt_len, c.gen_len) == (512, 32)
               for c in cases.values())
    # every Accelerate case names the ours case of the same model and batch it compares with
    for c in (c for c in cases.values() if c.runner == "accelerate"):
        ours = cases[c.note.rsplit("ours at the same batch: ", 1)[1]]
        assert (ours.runner, ours.model, ours.gpu_batch_size) == ("flexgen", c.model, c.gpu_batch_size)
    # 70B only with 4-bit weights and cache: 36 GiB of weights in host memory, not 128
    assert all(c.compress_weight and c.compress_cache for c in cases.values() if c.model == "llama-2-70b")


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [c.case for c in suites.load_suite("h100-llama")
                                     if c.runner == "flexgen"])
def test_flexgen_case_runs_scaled_down(case_id, tmp_path):
    from flexgen_repro import flex_opt
    case = _scaled(next(c for c in suites.load_suite("h100-llama") if c.case == case_id))
    s = runner.Settings(out=str(tmp_path), path=runner.DUMMY, offload_dir=str(tmp_path / "offload"))
    (tmp_path / "offload").mkdir()
    out = tmp_path / "r.json"
    argv = runner.flexgen_command(case, s, str(out), str(tmp_path / "r.log"))[3:]
    assert flex_opt.main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["model"] == "llama-tiny" and (rec["prompt_len"], rec["gen_len"]) == (PROMPT, GEN)
    if case.auto:  # compression flags allow it; the cost model's pick may leave it off
        assert rec["compress_weight"] <= case.compress_weight and rec["compress_cache"] <= case.compress_cache
    else:
        assert (rec["compress_weight"], rec["compress_cache"]) == (case.compress_weight, case.compress_cache)
        assert rec["percent"] == case.percent
        assert (rec["gpu_batch_size"], rec["num_gpu_batches"]) == (case.gpu_batch_size, case.num_gpu_batches)
    blocks = rec["gpu_batch_size"] * rec["num_gpu_batches"]
    assert rec["total_throughput"] == pytest.approx(
        blocks * GEN / (rec["prefill_latency_s"] + rec["decode_latency_s"]), rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [c.case for c in suites.load_suite("h100-llama")
                                     if c.runner == "accelerate"])
def test_accelerate_case_runs_scaled_down(case_id, tmp_path):
    pytest.importorskip("accelerate")
    from flexgen_repro.bench import baselines
    case = _scaled(next(c for c in suites.load_suite("h100-llama") if c.case == case_id))
    s = runner.Settings(out=str(tmp_path), path=runner.DUMMY, offload_dir=str(tmp_path / "offload"))
    out = tmp_path / "r.json"
    argv = runner.accelerate_command(case, s, str(out), str(tmp_path / "r.log"))[3:]
    assert baselines.main(argv) == 0
    rec = json.loads(out.read_text())
    cfg = get_model_config("llama-tiny")
    assert rec["model"] == "llama-tiny" and rec["system"] == "hf-accelerate"
    assert rec["gpu_batch_size"] == case.gpu_batch_size and rec["model_size_gb"] * (1 << 30) == \
        pytest.approx(cfg.model_bytes(), rel=1e-12)
    # no GPU: the device_map is {"": "cpu"}, every weight in host memory
    assert rec["weight_placement"] == {"gpu": 0.0, "cpu": 100.0, "disk": 0.0}
    assert rec["total_throughput"] == pytest.approx(
        case.gpu_batch_size * GEN / (rec["prefill_latency_s"] + rec["decode_latency_s"]), rel=1e-9)


def test_baseline_record_of_a_llama_feeds_the_hardware_limit():
    from flexgen_repro.bench import baselines, limits
    cfg = get_model_config("mistral-7b")
    rec = baselines.build_record(cfg, 32, 512, 32, 1.0, 9.0, {"gpu": 82.0, "cpu": 18.0, "disk": 0.0},
                                 15.0, 20.0, "NVIDIA H100")
    assert rec["cache_size_gb"] * (1 << 30) == 2 * 32 * 544 * 32 * 8 * 128 * 2  # per KV head
    lim = limits.record_limit(rec, limits.BUILTIN["h100-reference"])
    assert lim.terms["unpinned weights over PCIe"] == pytest.approx(0.18 * cfg.model_bytes() / 54.7e9,
                                                                    rel=1e-12)
