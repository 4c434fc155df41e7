"""The runner with a fake case command (a few lines of Python that write a flex_opt-style record):
raw JSON, CSV with the contract's columns, Markdown and PNG; skip, failure and timeout records;
tables.main rebuilding identical outputs from raw; bad input; and the real command lines parsed by
flex_opt's and the baseline's own argument parsers."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

import pytest

from flexgen_repro.bench import limits, runner, suites, tables
from flexgen_repro.config import get_opt_config

FAKE = r"""
import json, sys
json_file, mode, model, percent, gbs, ngb, prompt, gen = sys.argv[1:9]
if mode == "fail":
    print("boom: the fake case failed", file=sys.stderr)
    sys.exit(3)
if mode == "sleep":
    import time
    time.sleep(30)
n, gen = int(gbs) * int(ngb), int(gen)
prefill, decode = 0.5, 2.0
json.dump(dict(model=model, percent=percent, gpu_batch_size=int(gbs), num_gpu_batches=int(ngb),
               prompt_len=int(prompt), gen_len=gen, prefill_latency_s=prefill,
               decode_latency_s=decode, decode_throughput=n * (gen - 1) / decode,
               total_latency_s=prefill + decode, total_throughput=n * gen / (prefill + decode),
               peak_gpu_mem_gb=1.5, device="FakeGPU", compress_weight=False, compress_cache=False,
               cpu_cache_compute=False, dtype="float16", measured=True), open(json_file, "w"))
"""
SUITE = """case,model,prompt_len,gen_len,percent,gpu_batch_size,num_gpu_batches,timeout_s,paper_throughput,paper_system,paper_measured,paper_source,note
ok-1,opt-1.3b,512,32,0 100 100 0 100 0,16,1,60,242.55,original-flexgen,1,ref csv,ok
broken,opt-tiny,32,8,100 0 100 0 100 0,2,1,60,,,,,fail
toobig,opt-6.7b,512,32,100 0 100 0 100 0,2,1,60,130.03,original-flexgen,1,ref csv,ok
slow,opt-tiny,32,8,100 0 100 0 100 0,2,1,1,,,,,sleep
"""
HARDWARE = {"cuda_available": True, "gpu_name": "FakeGPU", "gpu_mem_gb": 4.0, "gpu_count": 1,
            "device": "FakeGPU", "cpu_model": "Fake CPU", "ram_gb": 64.0}


def fake_command(case, settings, json_file, log_file):
    return [sys.executable, "-c", FAKE, json_file, case.note, case.model, case.percent,
            str(case.gpu_batch_size), str(case.num_gpu_batches), str(case.prompt_len),
            str(case.gen_len)]


def fake_probe(offload_dir):
    return {"hardware": dict(HARDWARE), "versions": {"python": "3.11", "torch": "fake", "cuda": "12.8"}}


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "fake.csv").write_text(SUITE)
    monkeypatch.setattr(suites, "SUITES_DIR", str(folder))
    return tmp_path


def _run(tmp_path, **kw):
    out = str(tmp_path / "results")
    rc = runner.main("fake", None, out, "_DUMMY_", str(tmp_path / "offload"), kw.pop("cases", ""),
                     build=fake_command, probe=fake_probe, profile="h100-reference", **kw)
    return rc, os.path.join(out, "fake")


def test_runner_writes_raw_csv_markdown_and_png(fake_suite, capsys):
    rc, folder = _run(fake_suite)
    assert rc == 1  # one case failed and one timed out
    recs = {r["case"]: r for r in tables.load_records(folder)}
    assert {k: r["status"] for k, r in recs.items()} == \
        {"ok-1": "ok", "broken": "failed", "toobig": "skipped", "slow": "failed"}
    ok = recs["ok-1"]
    assert ok["total_throughput"] == pytest.approx(16 * 32 / 2.5)
    assert ok["ratio"] == pytest.approx(ok["total_throughput"] / 242.55)
    model_bytes = get_opt_config("opt-1.3b").model_bytes()
    assert ok["limit_throughput"] == pytest.approx(16 * 54.7e9 / model_bytes, rel=1e-12)
    assert ok["binding_term"] == "weights over PCIe"
    assert ok["fraction_of_limit"] == pytest.approx(ok["decode_throughput"] / ok["limit_throughput"])
    assert ok["hardware"] == HARDWARE and ok["versions"]["torch"] == "fake"
    assert ok["commit"] and ok["timestamp"] and ok["measured"] is True
    assert ok["paper_measured"] is True and ok["device"] == "FakeGPU"
    assert "boom: the fake case failed" in recs["broken"]["reason"]
    assert "timed out after 1 s" in recs["slow"]["reason"]
    assert "skipped" in capsys.readouterr().out

    with open(os.path.join(folder, "fake.csv")) as f:
        rows = list(csv.DictReader(f))
    for col in (*tables.CONTRACT_COLUMNS, *tables.COMPARISON_COLUMNS):
        assert col in rows[0], col
    row = rows[0]
    assert row["case"] == "ok-1" and float(row["total_throughput"]) == pytest.approx(
        ok["total_throughput"], abs=1e-4)
    assert row["compress_weight"] == "0" and row["commit"] == ok["commit"]
    md = open(os.path.join(folder, "fake.md")).read()
    assert "| ok-1 | ok | opt-1.3b | 512 | 32 | 0 100 100 0 100 0 |" in md
    assert "toobig (skipped): needs at least" in md
    with open(os.path.join(folder, "fake.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_skip_message_has_both_numbers(fake_suite):
    _, folder = _run(fake_suite, cases="toobig")
    rec = tables.load_records(folder)[0]
    need = get_opt_config("opt-6.7b").model_bytes() / (1 << 30)
    assert rec["status"] == "skipped" and rec["measured"] is False
    assert "GiB of GPU memory" in rec["reason"] and "there is 4.0 GiB" in rec["reason"]
    assert float(rec["reason"].split("needs at least ")[1].split()[0]) >= need


def test_tables_main_rebuilds_identical_outputs(fake_suite):
    _, folder = _run(fake_suite, cases="ok-1,toobig")
    names = [os.path.join(folder, f"fake.{ext}") for ext in ("csv", "md", "png")]
    before = [open(n, "rb").read() for n in names]
    for n in names:
        os.remove(n)
    assert tables.main(os.path.dirname(folder)) == 0
    assert [open(n, "rb").read() for n in names] == before


def test_bad_input_is_named(fake_suite, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert runner.main("nope", None, out, "_DUMMY_", str(tmp_path), "", build=fake_command,
                       probe=fake_probe) == 2
    assert "unknown suite 'nope'; choose one of: fake" in capsys.readouterr().err
    assert runner.main("fake", None, out, "_DUMMY_", str(tmp_path), "ok-1,zzz", build=fake_command,
                       probe=fake_probe) == 2
    assert "unknown case(s) ['zzz']" in capsys.readouterr().err
    assert runner.main("fake", -1.0, out, "_DUMMY_", str(tmp_path), "", probe=fake_probe) == 2
    assert tables.main(str(tmp_path / "empty")) == 1
    assert "run `invoke bench` first" in capsys.readouterr().err


def test_real_weights_missing_is_skipped_with_the_fix(tmp_path):
    case = suites.load_suite("t4-paper")[0]
    s = runner.Settings(out=str(tmp_path), path=str(tmp_path / "w"), offload_dir=str(tmp_path))
    reason = runner.why_not_run(case, s, HARDWARE)
    assert "invoke prepare-weights --model opt-6.7b" in reason and "--path _DUMMY_" in reason


def test_default_suite_depends_on_cuda():
    assert runner.default_suite({"cuda_available": False}) == ("smoke", ())
    assert runner.default_suite({"cuda_available": True}) == (suites.DEFAULT_GPU_SUITE,
                                                              suites.DEFAULT_GPU_CASES)


def test_flexgen_command_parses_with_flex_opt():
    flex_opt = pytest.importorskip("flexgen_repro.flex_opt")
    cases = {c.case: c for c in suites.load_suite("h100-anchors")}
    s = runner.Settings(out="o", path="/w", offload_dir="/off", gpu_mem_gb=None)
    args = flex_opt.build_parser().parse_args(runner.flexgen_command(cases["c-30b-paper"], s, "j", "l")[3:])
    assert (args.model, args.path, args.offload_dir) == ("opt-30b", "_DUMMY_", "/off")
    assert args.percent == "8 92 0 100 0 100".split()
    assert (args.gpu_batch_size, args.num_gpu_batches, args.prompt_len, args.gen_len) == (16, 3, 512, 32)
    assert args.cpu_cache_compute and args.overlap and not args.compress_weight
    assert (args.gpu_mem_gb, args.json_file, args.log_file) == (16.0, "j", "l")
    args = flex_opt.build_parser().parse_args(runner.flexgen_command(cases["6.7b-c-72"], s, "j", "l")[3:])
    assert args.compress_weight and args.compress_cache and args.overlap is False
    auto = runner.flexgen_command(cases["30b-auto"], s, "j", "l")
    assert "--gpu-batch-size" not in auto
    assert flex_opt.build_parser().parse_args(auto[3:]).percent == ["auto"]
    assert "--trace" not in runner.flexgen_command(cases["c-30b-paper"], s, "j", "l")
    traced = runner.Settings(out="o", path="/w", offload_dir="/off", trace=True)
    args = flex_opt.build_parser().parse_args(
        runner.flexgen_command(cases["c-30b-paper"], traced, "o/logs/c.child.json", "l")[3:])
    assert args.trace == "o/logs/c.trace.json"
    capped = runner.Settings(out="o", path="/w", offload_dir="/off", gpu_mem_gb=12)
    t4 = suites.load_suite("t4-paper")[0]
    args = flex_opt.build_parser().parse_args(runner.flexgen_command(t4, capped, "j", "l")[3:])
    assert (args.path, args.gpu_mem_gb, args.pin_weight) == ("/w", 12.0, True)


def test_accelerate_command_parses_with_the_baseline():
    from flexgen_repro.bench import baselines
    case = suites.load_suite("h100-baselines")[1]
    s = runner.Settings(out="o", path="/w", offload_dir="/off")
    cmd = runner.default_command(case, s, "j", "l")
    assert cmd[1:3] == ["-m", "flexgen_repro.bench.baselines"]
    args = baselines.build_parser().parse_args(cmd[3:])
    assert (args.model, args.batch_size, args.gpu_mem_gb, args.prompt_len) == ("opt-30b", 8, 16.0, 512)


def test_zero_inference_commands_parse_with_the_baseline():
    from flexgen_repro.bench import zero_inference
    cases = {c.case: c for c in suites.load_suite("h100-baselines")}
    s = runner.Settings(out="o", path="/w", offload_dir="/off")
    for name, bits in (("ds-30b-b8", 0), ("ds-30b-4bit-b8", 4)):
        cmd = runner.default_command(cases[name], s, "j", "l")
        assert cmd[1:3] == ["-m", "flexgen_repro.bench.zero_inference"]
        args = zero_inference.build_parser().parse_args(cmd[3:])
        assert (args.model, args.batch_size, args.gpu_mem_gb, args.quant_bits, args.no_pin) == \
            ("opt-30b", 8, 16.0, bits, False)


def test_deepspeed_case_without_deepspeed_is_skipped_with_why(monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    case = next(c for c in suites.load_suite("h100-baselines") if c.runner == "deepspeed")
    s = runner.Settings(out=str(tmp_path), path="_DUMMY_", offload_dir=str(tmp_path))
    assert "DeepSpeed is not installed" in runner.why_not_run(case, s, HARDWARE)


def test_profile_limits_match_limits_module(fake_suite):
    _, folder = _run(fake_suite, cases="ok-1")
    rec = tables.load_records(folder)[0]
    again = limits.record_limit(rec, limits.BUILTIN["h100-reference"])
    assert rec["limit_terms"] == pytest.approx(again.terms) and rec["limit_profile"] == "h100-reference"
    assert json.load(open(os.path.join(folder, "raw", "ok-1.json")))["case"] == "ok-1"


def test_accelerate_case_without_accelerate_is_skipped_with_why(monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real(name, *a))
    case = suites.load_suite("h100-baselines")[0]
    s = runner.Settings(out=str(tmp_path), path="_DUMMY_", offload_dir=str(tmp_path))
    assert "HF Accelerate is not installed" in runner.why_not_run(case, s, HARDWARE)


def test_git_state_reads_the_repository_or_the_image_build_arg(tmp_path, monkeypatch):
    import subprocess
    from flexgen_repro.bench import records
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=records.REPO_ROOT, capture_output=True,
                          text=True)
    if head.returncode == 0:
        state = records.git_state()
        assert state["commit_full"] == head.stdout.strip()
        assert state["commit"].startswith(head.stdout.strip()[:7])
        assert state["commit"].endswith("-dirty") == state["dirty"]
    monkeypatch.setenv("FLEXGEN_REPRO_COMMIT", "0123456789abcdef")  # wins over a (stale) .git
    assert records.git_state() == records.git_state(str(tmp_path)) == {"commit": "0123456", "commit_full": "0123456789abcdef",
                                                "dirty": None}
    monkeypatch.delenv("FLEXGEN_REPRO_COMMIT")
    assert records.git_state(str(tmp_path))["commit"] == "unknown"


def test_disk_io_column_reaches_flex_opt_and_is_refused_for_other_runners():
    cases = {c.case: c for c in suites.load_suite("placements")}
    direct = cases["1.3b-wdisk-1x16-direct"]
    assert direct.disk_io == "direct" and cases["1.3b-wdisk-1x16"].disk_io == "auto"
    s = runner.Settings(out="/tmp/o", path="_DUMMY_", offload_dir="/tmp/off")
    cmd = runner.flexgen_command(direct, s, "j.json", "l.log")
    assert cmd[cmd.index("--disk-io") + 1] == "direct"
    assert "--disk-io" not in runner.flexgen_command(cases["1.3b-wdisk-1x16"], s, "j", "l")
    with pytest.raises(ValueError, match="only for flexgen cases"):
        dataclasses.replace(cases["orig-1.3b-wdisk-1x16"], disk_io="direct").validate()


ENV_FAKE = r"""
import json, os, sys
json_file = sys.argv[1]
tree = os.environ["PYTHONPATH"].split(os.pathsep)[0]
json.dump(dict(total_throughput=200.0 if tree.endswith("base") else 250.0, decode_throughput=1.0,
               prefill_latency_s=0.1, decode_latency_s=1.0, device="FakeGPU", tree=tree,
               env_commit=os.environ.get("FLEXGEN_REPRO_COMMIT", "")), open(json_file, "w"))
"""
BASE_SUITE = """case,model,prompt_len,gen_len,percent,gpu_batch_size,num_gpu_batches,timeout_s,repeat,note
ok-1,opt-1.3b,512,32,0 100 100 0 100 0,16,1,60,2,ok
"""


def _env_command(case, settings, json_file, log_file):
    return [sys.executable, "-c", ENV_FAKE, json_file]


def test_a_baseline_tree_runs_each_case_just_before_ours_and_is_summarized(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "fake.csv").write_text(BASE_SUITE)
    monkeypatch.setattr(suites, "SUITES_DIR", str(folder))
    base = tmp_path / "base"
    (base / "flexgen_repro").mkdir(parents=True)
    (base / "flexgen_repro" / "flex_opt.py").write_text("")
    (base / "COMMIT").write_text("feedbeef0123456789\n")
    out = str(tmp_path / "results")
    assert runner.main("fake", None, out, "_DUMMY_", str(tmp_path / "off"), build=_env_command,
                       probe=fake_probe, baseline=str(base)) == 0
    printed = [line.split("] ")[1].split(":")[0] for line in capsys.readouterr().out.splitlines()
               if line.startswith("[")]
    # the twins take turns with ours, the baseline first in each round
    assert printed == ["base-ok-1", "ok-1", "base-ok-1.rep2", "ok-1.rep2"]
    recs = {r["case"]: r for r in tables.load_records(os.path.join(out, "fake"))}
    for rep in ("", ".rep2"):
        twin, ours = recs["base-ok-1" + rep], recs["ok-1" + rep]
        assert twin["tree"] == str(base) and twin["env_commit"] == "feedbeef0123456789"
        assert twin["commit"] == "feedbee" and twin["commit_full"] == "feedbeef0123456789"
        assert ours["tree"] != str(base) and ours["commit"] != "feedbee"
    (summary,) = [line for line in open(os.path.join(out, "fake", "fake.md"))
                  if line.startswith("| ok-1 | FakeGPU |")]
    assert "| feedbee | 2 | 250.0 | 200.0 | 1.25x | 1.25x - 1.25x |" in summary


def test_a_baseline_that_is_not_a_checkout_is_refused_naming_the_fix(tmp_path, fake_suite, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert _run(fake_suite, baseline=str(bare))[0] == 2
    assert "no flexgen_repro package there" in capsys.readouterr().err
    (bare / "flexgen_repro").mkdir()
    (bare / "flexgen_repro" / "flex_opt.py").write_text("")
    assert _run(fake_suite, baseline=str(bare))[0] == 2
    assert f"write the commit into {bare}/COMMIT" in capsys.readouterr().err


def test_a_run_into_a_folder_with_records_never_overwrites_a_measurement(fake_suite):
    """Measured records are kept (the new one becomes `<case>.repN`); a failed one is replaced."""
    _run(fake_suite, cases="ok-1,broken")
    rc, folder = _run(fake_suite, cases="ok-1,broken")
    recs = {r["case"]: r for r in tables.load_records(folder)}
    assert set(recs) == {"ok-1", "ok-1.rep2", "broken"}
    assert recs["ok-1"]["timestamp"] <= recs["ok-1.rep2"]["timestamp"]
    assert os.path.isfile(os.path.join(folder, "logs", "ok-1.log"))       # each run's log kept
    assert os.path.isfile(os.path.join(folder, "logs", "ok-1.rep2.log"))
    _run(fake_suite, cases="ok-1")
    assert "ok-1.rep3" in {r["case"] for r in tables.load_records(folder)}


def test_results_add_copies_a_run_folder_in_without_overwriting(fake_suite, capsys):
    """`invoke results --add RUN`: a record measured again comes in as `<case>.repN`; one the
    results already hold is not copied twice; a folder with no suite records exits 2."""
    _, kept = _run(fake_suite, cases="ok-1")
    run_dir = str(fake_suite / "run")
    runner.main("fake", None, run_dir, "_DUMMY_", str(fake_suite / "offload"), "ok-1",
                build=fake_command, probe=fake_probe, profile="h100-reference")
    out = str(fake_suite / "results")
    assert tables.main(out, add=run_dir) == 0
    recs = {r["case"]: r for r in tables.load_records(kept)}
    assert set(recs) == {"ok-1", "ok-1.rep2"} and recs["ok-1.rep2"]["case"] == "ok-1.rep2"
    assert tables.main(out, add=run_dir) == 0            # again: nothing new
    assert len(tables.load_records(kept)) == 2
    assert "all were there already" in capsys.readouterr().out
    assert tables.main(out, add=str(fake_suite / "nothing")) == 2
    assert "give the folder `invoke bench --out` wrote" in capsys.readouterr().err
