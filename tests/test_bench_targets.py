"""The target suites (placements, table2, table2-large, sweep-30b), repeats run in rounds, and the
median and range of same-call pairs in the tables.

The paper's published policies are the copy in tests/data/reference/paper_t4_policies.csv.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re

import pytest

from flexgen_repro.bench import fit, runner, suites, tables
from flexgen_repro.config import get_opt_config
from flexgen_repro.cost_model.hardware import load_profile
from flexgen_repro.cost_model.calibrate import record_policy as calibrate_policy
from flexgen_repro.cost_model.predict import evaluate_policy

GiB = 1 << 30
DATA = os.path.join(os.path.dirname(__file__), "data", "reference", "paper_t4_policies.csv")
TWIN_FIELDS = ("model", "prompt_len", "gen_len", "percent", "gpu_batch_size", "num_gpu_batches",
               "overlap", "sep_layer", "pin_weight", "cpu_cache_compute", "compress_weight",
               "compress_cache", "gpu_mem_gb")


def _raw(suite: str) -> dict:
    """The suite's cases as written (repeats not expanded), by id."""
    return {c.case: c for c in suites.read_cases(suites.suite_file(suite), suite)}


def test_repeats_run_in_rounds_with_suffixed_ids():
    cases = suites.load_suite("placements")
    ids = [c.case for c in cases]
    assert ids[:2] == ["1.3b-wdisk-1x16", "orig-1.3b-wdisk-1x16"]
    assert ids[2] == "1.3b-wdisk-1x16-direct"       # the drive's own rate: one run, no twin
    assert ids[9:11] == ["1.3b-wdisk-1x16.rep2", "orig-1.3b-wdisk-1x16.rep2"]
    assert len(ids) == 3 * 8 + 1 and len(set(ids)) == len(ids)
    assert [c.index for c in cases] == list(range(len(cases)))
    assert suites.base_case("orig-1.3b-wdisk-1x16.rep3") == ("orig-1.3b-wdisk-1x16", 3)
    assert suites.base_case("opt-6.7b") == ("opt-6.7b", 1)
    picked = suites.select_cases(cases, "1.3b-wdisk-1x16")
    assert [c.case for c in picked] == ["1.3b-wdisk-1x16", "1.3b-wdisk-1x16.rep2",
                                        "1.3b-wdisk-1x16.rep3"]


@pytest.mark.parametrize("row, message", [
    ("x,opt-1.3b,512,32,100 0 100 0 100 0,4,1,0", "repeat must be >= 1"),
    ("x,opt-1.3b,512,32,100 0 100 0 100 0,4,1,1,h100", "leave it empty"),
])
def test_bad_repeat_and_hardware_are_named(tmp_path, row, message):
    path = tmp_path / "s.csv"
    path.write_text("case,model,prompt_len,gen_len,percent,gpu_batch_size,num_gpu_batches,repeat,"
                    "hardware\n" + row + "\n")
    with pytest.raises(ValueError, match=message):
        suites.read_cases(str(path))


def test_placements_pair_each_of_ours_with_the_original_on_the_same_placement():
    cases = _raw("placements")
    ours = [c for c in cases.values() if c.runner == "flexgen" and c.disk_io == "auto"]
    assert cases["1.3b-wdisk-1x16-direct"].disk_io == "direct"
    assert {c.case for c in ours} == {"1.3b-wdisk-1x16", "1.3b-cdisk-cpuattn-1x16",
                                      "1.3b-wcpu-overlap-1x16", "1.3b-wcpu-overlap-4x4"}
    for c in ours:
        twin = cases["orig-" + c.case]
        assert twin.runner == "original"
        assert all(getattr(c, f) == getattr(twin, f) for f in TWIN_FIELDS), c.case
        assert (c.model, c.prompt_len, c.gen_len, c.gpu_mem_gb, c.weights) == \
            ("opt-1.3b", 512, 32, 16.0, "dummy")
        assert c.repeat >= 3 and twin.repeat == c.repeat


def test_table2_runs_our_pick_beside_the_papers_published_policies():
    with open(DATA) as f:
        paper = {r["case"]: r for r in csv.DictReader(f)}
    cases = {**_raw("table2"), **_raw("table2-large")}
    for ours, ref in (("t2-6.7b", "6b7-512"), ("t2-6.7b-c", "6b7c-512"), ("t2-30b", "30b-512"),
                      ("t2-30b-c", "30bc-512"), ("t2-175b-c", "175bc-512")):
        mine, orig, row = cases[ours], cases["orig-" + ours], paper[ref]
        assert mine.auto and mine.hardware == "h100" and mine.gpu_mem_gb == 16
        assert (mine.compress_weight or mine.compress_cache) == ours.endswith("-c")
        assert orig.runner == "original" and orig.model == row["model"] == mine.model
        assert orig.percent == row["percent"]
        block = (int(row["gpu_batch_size"]), int(row["num_gpu_batches"]))
        fields = ("pin_weight", "cpu_cache_compute", "compress_weight", "compress_cache", "overlap")
        if (orig.gpu_batch_size, orig.num_gpu_batches) == block:
            for field in fields:
                assert getattr(orig, field) == bool(int(row[field])), (ours, field)
            continue
        # the paper's block may not fit an H100 machine's 125 GiB of host memory (the original's
        # floor, bench/fit.py): then the twin keeps the paper's placement at a smaller block that
        # fits, with at most more compression, and its note says why
        paper_case = dataclasses.replace(orig, gpu_batch_size=block[0], num_gpu_batches=block[1],
                                         **{f: bool(int(row[f])) for f in fields})
        assert fit.case_needs(paper_case).total("cpu") > 125 * GiB, ours
        assert fit.case_needs(orig).total("cpu") < 100 * GiB, ours
        assert orig.gpu_batch_size * orig.num_gpu_batches < block[0] * block[1], ours
        assert "host memory" in orig.note, ours
        for field in ("pin_weight", "cpu_cache_compute", "overlap"):
            assert getattr(orig, field) == bool(int(row[field])), (ours, field)
        for field in ("compress_weight", "compress_cache"):
            assert getattr(orig, field) >= bool(int(row[field])), (ours, field)


def test_auto_cases_ask_flex_opt_for_their_profile():
    from flexgen_repro import flex_opt
    case = _raw("table2")["t2-30b-c"]
    s = runner.Settings(out="o", path="_DUMMY_", offload_dir="/tmp/off", gpu_mem_gb=None)
    cmd = runner.flexgen_command(case, s, "r.json", "r.log")
    args = flex_opt.build_parser().parse_args(cmd[3:])
    assert args.hardware == "h100" and args.percent == ["auto"] and args.gpu_mem_gb == 16
    assert args.compress_weight and args.compress_cache




def test_sweep_cases_fit_and_their_notes_give_the_cost_models_prediction():
    profile = load_profile("h100").with_memory(gpu_gb=16)
    config = get_opt_config("opt-30b")
    cases = _raw("sweep-30b")
    for case in cases.values():
        if case.runner == "original":   # the original on one of ours' policies: its twin's
            twin = cases[case.case[len("orig-"):]]
            assert (case.percent, case.gpu_batch_size, case.num_gpu_batches) == \
                (twin.percent, twin.gpu_batch_size, twin.num_gpu_batches), case.case
            continue
        pred = evaluate_policy(config, case.policy(), profile, case.prompt_len, case.gen_len)
        assert pred.feasible, case.case
        stated = float(re.search(r"predicted ([0-9.]+) tok/s", case.note).group(1))
        assert stated == pytest.approx(pred.throughput, abs=0.05), case.case


def _record(case: str, ours: float, stamp: str, commit: str = "abc1234") -> dict:
    return {"case": case, "status": "ok", "runner": "original" if case.startswith("orig-") else "flexgen",
            "total_throughput": ours, "timestamp": stamp, "hardware": {"gpu_name": "H100"},
            "device": "H100", "commit": commit, "percent": "0 100 100 0 100 0", "index": 0}


def test_tables_give_the_median_and_range_of_same_call_pairs(tmp_path):
    stamp = "2026-01-01T00:00:00+00:00"
    recs = []
    for suffix, ours, orig in (("", 30.0, 20.0), (".rep2", 33.0, 20.0), (".rep3", 24.0, 20.0)):
        recs += [_record("x" + suffix, ours, stamp), _record("orig-x" + suffix, orig, stamp)]
    (summary,) = tables.pair_summary(tables.side_by_side(recs))
    # ratios 1.5, 1.65, 1.2: the median is the middle one, the range their extremes
    assert summary["pairs"] == 3 and summary["case"] == "x"
    assert summary["ratio"] == pytest.approx(1.5)
    assert (summary["ratio_min"], summary["ratio_max"]) == (pytest.approx(1.2), pytest.approx(1.65))
    assert summary["ours"] == 30.0 and summary["original"] == 20.0
    raw = tmp_path / "s" / "raw"
    raw.mkdir(parents=True)
    for r in recs:
        (raw / f"{r['case']}.json").write_text(json.dumps(r))
    tables.write_markdown(tables.load_records(str(tmp_path / "s")), str(tmp_path / "t.md"), "s")
    assert "| x | H100 | abc1234 | 3 | 30.00 | 20.00 | 1.50x | 1.20x - 1.65x |" in \
        (tmp_path / "t.md").read_text()


def test_pairs_of_another_commit_are_summarized_apart():
    stamp = "2026-01-01T00:00:00+00:00"
    recs = []
    for suffix, ours, commit in (("", 30.0, "aaa"), (".rep2", 31.0, "aaa"), (".rep3", 32.0, "aaa"),
                                 (".rep4", 60.0, "bbb"), (".rep5", 62.0, "bbb")):
        recs += [_record("x" + suffix, ours, stamp, commit), _record("orig-x" + suffix, 20.0, stamp, commit)]
    rows = {r["commit"]: r for r in tables.pair_summary(tables.side_by_side(recs))}
    assert set(rows) == {"aaa", "bbb"}
    assert (rows["aaa"]["pairs"], rows["aaa"]["ratio"]) == (3, pytest.approx(31.0 / 20.0))
    assert (rows["bbb"]["pairs"], rows["bbb"]["ratio"]) == (2, pytest.approx(61.0 / 20.0))


def test_flex_opt_records_the_prediction_of_its_auto_pick(tmp_path):
    from flexgen_repro import flex_opt
    from flexgen_repro.cost_model import calibrate
    out = tmp_path / "r.json"
    argv = ["--model", "opt-tiny", "--path", "_DUMMY_", "--offload-dir", str(tmp_path / "off"),
            "--prompt-len", "8", "--gen-len", "2", "--percent", "auto", "--hardware", "t4-paper",
            "--json-file", str(out), "--log-file", str(tmp_path / "r.log"), "--no-warmup"]
    assert flex_opt.main(argv) == 0
    record = json.loads(out.read_text())
    # the recorded figure is the cost model's prediction of the policy that ran (same arithmetic)
    ran = calibrate.record_policy(record)
    pred = evaluate_policy(get_opt_config("opt-tiny"), ran, load_profile("t4-paper"), 8, 2)
    assert record["predicted_throughput"] == pytest.approx(pred.throughput, rel=1e-9)


def test_the_sweeps_first_case_is_the_cost_models_pick_for_opt_30b_4bit():
    """The sweep is built around what `invoke policy --model opt-30b --hardware h100 --gpu-mem-gb 16
    --compress` picks: its first case is that policy (a profile change that moves the pick shows
    up here, and the sweep's cases and notes follow it)."""
    from flexgen_repro.cost_model.search import best_policy
    result = best_policy(get_opt_config("opt-30b"), load_profile("h100"), 512, 32, compress=True,
                         gpu_mem_gb=16)
    first = next(iter(_raw("sweep-30b").values()))
    assert "the cost model's pick" in first.note
    mine, pick = first.policy(), result.policy
    assert mine.percent == pick.percent
    assert (mine.gpu_batch_size, mine.num_gpu_batches) == (pick.gpu_batch_size, pick.num_gpu_batches)
    assert (mine.compress_weight, mine.compress_cache) == (pick.compress_weight, pick.compress_cache)


def _at(case: str, tok_s: float, minute: int, hardware="H100", commit="abc1234", **kw) -> dict:
    stamp = f"2026-01-01T10:{minute:02d}:00+00:00"
    r = _record(case, tok_s, stamp, commit)
    r["hardware"] = {"gpu_name": hardware}
    return {**r, "model": "opt-30b", "prompt_len": 512, "gen_len": 32, "percent": "44 56 0 100 100 0",
            "gpu_batch_size": 48, "num_gpu_batches": 8, "compress_weight": True,
            "compress_cache": True, **kw}


def test_an_original_pairs_with_the_latest_of_ours_before_it():
    """Calls chained close together: ours of the second call is nearer in time to the first
    call's original than that original's own twin is, yet each original pairs within its call."""
    ours = [_at("x", 160.0, 2), _at("x.rep2", 164.0, 6), _at("x.rep3", 150.0, 30, hardware="H200")]
    orig = [_at("orig-x", 37.0, 4), _at("orig-x.rep2", 38.0, 9), _at("orig-x.rep3", 40.0, 0)]
    pairs = tables.call_pairs(ours, orig)
    # x.rep2 is 2 minutes after orig-x, 3 before orig-x.rep2; orig-x.rep3 ran before every ours of
    # its machine; x.rep3 ran on another machine
    assert [(o["case"], r["case"]) for o, r in pairs] == [("x", "orig-x"), ("x.rep2", "orig-x.rep2")]


def test_the_table2_summary_folds_pairs_across_suites(tmp_path, monkeypatch):
    rows = tmp_path / "rows.csv"
    rows.write_text("model,compression,ours,original,note\n"
                    "opt-30b,4-bit,sweep/s30 table2/t2-30b-c,table2/orig-t2-30b-c,paper's placement\n"
                    "opt-66b,4-bit,table2/t2-66b-c,table2/orig-t2-66b-c,paper's placement\n"
                    "opt-6.7b,none,table2/t2-6.7b,table2/orig-t2-6.7b,paper's policy\n")
    monkeypatch.setattr(tables, "TABLE2_ROWS", str(rows))
    recs = {"sweep": [_at("s30", 160.0, 0, fraction_of_limit=0.9, binding_term="PCIe"),
                      _at("s30.rep2", 164.0, 5, fraction_of_limit=0.92, binding_term="PCIe"),
                      _at("s30.rep3", 162.0, 10, fraction_of_limit=0.91, binding_term="PCIe")],
            "table2": [_at("orig-t2-30b-c", 40.0, 3), _at("orig-t2-30b-c.rep2", 41.0, 8),
                       _at("orig-t2-30b-c.rep3", 36.0, 13),
                       _at("t2-66b-c", 80.0, 20), _at("orig-t2-66b-c", 20.0, 25)]}
    for suite, records in recs.items():
        (tmp_path / suite / "raw").mkdir(parents=True)
        for r in records:
            (tmp_path / suite / "raw" / f"{r['case']}.json").write_text(json.dumps(r))
    lines = open(tables.write_table2(str(tmp_path))).read().splitlines()
    # ratios 4.0, 4.0, 4.5: the median and the range; ours' decode / limit the median of three;
    # the cost model's figure for the policy, against ours' median
    predicted = evaluate_policy(get_opt_config("opt-30b"), calibrate_policy(recs["sweep"][0]),
                                load_profile("h100"), 512, 32).throughput
    assert ("| opt-30b | 4-bit | H100 | abc1234 | `44 56 0 100 100 0`, 48x8 | 162.0 (160.0-164.0) "
            f"| {predicted:.1f} ({100 * (predicted / 162 - 1):+.0f}%) | 0.91 (PCIe) | `44 56 0 100 100 0`, 48x8 | 40.00 (36.00-41.00) | 3 | 4.00x (4.00-4.50x) "
            "| paper's placement |") in lines
    assert any(l.startswith("| opt-66b | 4-bit |") and "| 80.00 |" in l
               and "| 1 | fewer than 3 pairs |" in l for l in lines)
    assert any(l.startswith("| opt-6.7b | none |") and "not measured" in l for l in lines)


def test_table2_summary_shows_ours_alone_with_the_cards_profile(tmp_path, monkeypatch):
    """A row whose original never ran beside ours shows ours alone, with no ratio, predicted with
    the shipped profile of the card that ran it (h200 for an H200)."""
    rows = tmp_path / "rows.csv"
    rows.write_text("model,compression,ours,original,note\n"
                    "opt-30b,none,table2/t2-30b,table2/orig-t2-30b,paper's policy\n")
    monkeypatch.setattr(tables, "TABLE2_ROWS", str(rows))
    rec = dict(_at("t2-30b", 43.5, 0), device="NVIDIA H200", percent="0 100 21 79 100 0",
               gpu_batch_size=24, num_gpu_batches=3, cpu_cache_compute=True, compress_weight=False,
               compress_cache=False)
    (tmp_path / "table2" / "raw").mkdir(parents=True)
    (tmp_path / "table2" / "raw" / "t2-30b.json").write_text(json.dumps(rec))
    lines = open(tables.write_table2(str(tmp_path))).read().splitlines()
    predicted = evaluate_policy(get_opt_config("opt-30b"), calibrate_policy(rec),
                                load_profile("h200"), 512, 32).throughput
    assert predicted != evaluate_policy(get_opt_config("opt-30b"), calibrate_policy(rec),
                                        load_profile("h100"), 512, 32).throughput
    row = [l for l in lines if l.startswith("| opt-30b | none |")]
    assert len(row) == 1
    assert (f"| NVIDIA H200 | abc1234 | `0 100 21 79 100 0`, 24x3, CPU attention | 43.50 | "
            f"{tables._md_cell(predicted)} "
            f"({100 * (predicted / 43.5 - 1):+.0f}%) | - | table2/orig-t2-30b | - | 0 | ours alone |"
            ) in row[0]
    assert tables.card_profile("NVIDIA H100 80GB HBM3") == "h100"
