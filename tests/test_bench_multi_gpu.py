"""The multi-GPU suite: its cases load, each becomes a torchrun line whose flags the per-rank
commands accept, the runner refuses it (exit 2, naming the GPU count) on a machine with fewer
GPUs, and scaling efficiency is worked out by hand."""
from __future__ import annotations

import dataclasses
import json

import pytest

from flexgen_repro.bench import multi_gpu, runner, suites
from flexgen_repro.bench.original_dist import dist_build_parser
from flexgen_repro.dist_flex_opt import dist_parser


def _probe(gpus: int):
    def probe(offload_dir):
        hw = {"cuda_available": gpus > 0, "gpu_name": "FakeGPU", "gpu_mem_gb": 80.0,
              "gpu_count": gpus, "device": "FakeGPU", "cpu_model": "Fake CPU", "ram_gb": 64.0}
        return {"hardware": hw, "versions": {"python": "3.11", "torch": "fake", "cuda": "12.8"}}
    return probe


def test_suite_has_30b_and_175b_on_1_2_4_gpus_beside_the_original():
    cases = suites.load_suite("multi-gpu")
    shapes = {(c.runner, c.model, c.gpus, c.compress_weight) for c in cases}
    for runner_name in ("flexgen-dist", "original-dist"):
        for gpus in (1, 2, 4):
            assert (runner_name, "opt-30b", gpus, False) in shapes
            assert (runner_name, "opt-175b", gpus, True) in shapes


def test_commands_launch_torchrun_with_flags_the_ranks_accept(tmp_path):
    s = runner.Settings(out=str(tmp_path), path="_DUMMY_", offload_dir=str(tmp_path / "off"))
    for case in suites.load_suite("multi-gpu"):
        cmd = runner.default_command(case, s, "c.json", "c.log")
        assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(case.gpus)]
        module, flags = cmd[7], cmd[8:]
        parser = dist_parser() if module == "flexgen_repro.dist_flex_opt" else dist_build_parser()
        args = parser.parse_args(flags)
        assert (args.gpu_batch_size, args.num_gpu_batches) == (case.gpu_batch_size, case.num_gpu_batches)
        assert args.comm_device == "gpu" and args.json_file == "c.json"


def test_runner_refuses_a_suite_needing_more_gpus(tmp_path, capsys):
    rc = runner.main("multi-gpu", None, str(tmp_path / "r"), "_DUMMY_", str(tmp_path / "off"),
                     probe=_probe(1))
    assert rc == 2
    err = capsys.readouterr().err
    assert "need 4 GPUs" in err and "this machine has 1" in err


def test_gpu_check_passes_with_enough_gpus():
    cases = suites.load_suite("multi-gpu")
    multi_gpu.check_gpus(cases, {"gpu_count": 4})
    multi_gpu.check_gpus([c for c in cases if c.gpus == 1], {"gpu_count": 0})
    with pytest.raises(ValueError, match="need 2 GPUs"):
        multi_gpu.check_gpus([c for c in cases if c.gpus <= 2], {"gpu_count": 1})


def test_gpus_above_one_only_for_pipeline_runners():
    case = suites.load_suite("multi-gpu")[0]
    with pytest.raises(ValueError, match="gpus must be"):
        dataclasses.replace(case, runner="flexgen", gpus=2).validate()


def _rec(case, thr, status="ok"):
    return {"case": case, "runner": "flexgen-dist", "model": "opt-30b", "status": status,
            "total_throughput": thr, "decode_throughput": thr}


def test_scaling_efficiency_by_hand(tmp_path):
    # 1 GPU: 10 tok/s; 2 GPUs: 18 (1.8x, 90%); 4 GPUs: 30 (3x, 75%); a failed 4-GPU twin and a
    # 2-GPU case without a 1-GPU twin give no row
    records = [_rec("a-1gpu", 10.0), _rec("a-2gpu", 18.0), _rec("a-4gpu", 30.0),
               _rec("b-1gpu", 5.0), _rec("b-4gpu", 0.0, status="failed"), _rec("c-2gpu", 7.0)]
    rows = multi_gpu.scaling_rows(records)
    assert [(r["case"], r["baseline_case"], r["gpus"]) for r in rows] == [
        ("a-2gpu", "a-1gpu", 2), ("a-4gpu", "a-1gpu", 4)]
    assert [r["speedup"] for r in rows] == pytest.approx([1.8, 3.0])
    assert [r["scaling_efficiency"] for r in rows] == pytest.approx([0.9, 0.75])
    raw = tmp_path / "raw"
    raw.mkdir()
    for r in records:
        (raw / f"{r['case']}.json").write_text(json.dumps(r))
    written = multi_gpu.write_scaling(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == ["scaling.csv", "scaling.md"]
    assert "| a-4gpu | flexgen-dist | opt-30b | 4 | 30.000 |" in (tmp_path / "scaling.md").read_text()
