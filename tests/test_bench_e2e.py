"""Two smoke cases end to end through the real `python -m flexgen_repro.flex_opt` (dummy opt-tiny
on the CPU): the runner's raw records, CSV and Markdown carry what flex_opt measured."""
from __future__ import annotations

import csv
import os

import pytest

from flexgen_repro.bench import runner, tables


@pytest.mark.slow
def test_two_smoke_cases_through_flex_opt(tmp_path):
    out = str(tmp_path / "results")
    cases = "gpu-noverlap,wdisk-overlap-k"
    assert runner.main("smoke", None, out, "~/opt_weights", str(tmp_path / "offload"), cases) == 0
    folder = os.path.join(out, "smoke")
    recs = tables.load_records(folder)
    assert [r["case"] for r in recs] == cases.split(",")
    for r in recs:
        assert r["status"] == "ok" and r["measured"] is True and r["model"] == "opt-tiny"
        blocks = r["gpu_batch_size"] * r["num_gpu_batches"]
        # flex_opt's figures are consistent with its own latencies (its definition of throughput)
        assert r["total_throughput"] == pytest.approx(
            blocks * r["gen_len"] / (r["prefill_latency_s"] + r["decode_latency_s"]), rel=1e-9)
        assert r["hardware"]["cpu_cores_logical"] >= 1 and r["versions"]["torch"]
    disk = recs[1]
    assert disk["percent"] == "0 0 100 0 100 0" and disk["weight_placement"]["disk"] == pytest.approx(100)
    with open(os.path.join(folder, "smoke.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [row["case"] for row in rows] == cases.split(",")
    assert float(rows[1]["decode_throughput"]) == pytest.approx(disk["decode_throughput"], abs=1e-4)
    assert "| wdisk-overlap-k | ok | opt-tiny |" in open(os.path.join(folder, "smoke.md")).read()


@pytest.mark.slow
def test_a_traced_case_keeps_its_timeline_and_summary(tmp_path):
    """`invoke bench --trace`: flex_opt runs with --trace; the timeline sits beside the case's logs
    and the record carries its busy seconds per phase, thread and span."""
    out = str(tmp_path / "results")
    assert runner.main("smoke", None, out, "~/opt_weights", str(tmp_path / "offload"),
                       "ccpu-overlap-k", trace=True) == 0
    (rec,) = tables.load_records(os.path.join(out, "smoke"))
    assert rec["status"] == "ok" and rec["traced"] is True
    decode = rec["trace_summary"]["decode"]
    assert decode["wall"] > 0 and any(k.startswith("MainThread/") for k in decode)
    assert os.path.isfile(os.path.join(out, "smoke", "logs", "ccpu-overlap-k.trace.json"))
