"""flex_opt's runtime flags: --profile, --trace FILE, --disk-io, --cpu-attention-threads and
--cuda-graphs become one RuntimeOptions; a run with them writes its trace and record; a bad value
exits 2 with the fix; and main() leaves the CUDA allocator setting a user gave alone."""
from __future__ import annotations

import json
import os

import pytest
import torch

from flexgen_repro import flex_opt, metrics
from flexgen_repro.options import RuntimeOptions

TINY = ["--model", "opt-tiny", "--path", "_DUMMY_", "--prompt-len", "8", "--gen-len", "3",
        "--gpu-batch-size", "2", "--num-gpu-batches", "2", "--dtype", "float32", "--verbose", "0",
        "--percent", "0", "100", "0", "100", "100", "0", "--cpu-cache-compute"]


def test_flags_make_the_runtime_options():
    args = flex_opt.build_parser().parse_args(
        TINY + ["--profile", "--trace", "t.json", "--disk-io", "buffered",
                "--cpu-attention-threads", "3", "--cuda-graphs", "false"])
    assert flex_opt.options_from_args(args) == RuntimeOptions(
        cuda_graphs=False, disk_io="buffered", cpu_attention_threads=3, profile=True,
        trace_path="t.json")
    default = flex_opt.options_from_args(flex_opt.build_parser().parse_args(TINY))
    assert default == RuntimeOptions()


def test_a_traced_profiled_run_writes_its_trace_and_record(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # main() sets it; undone after
    trace_file, record = tmp_path / "trace.json", tmp_path / "rec.json"
    argv = TINY + ["--offload-dir", str(tmp_path / "off"), "--log-file", str(tmp_path / "log"),
                   "--json-file", str(record), "--trace", str(trace_file), "--profile",
                   "--cpu-attention-threads", "1"]
    assert flex_opt.main(argv) == 0
    summary = json.loads(trace_file.read_text())["summary"]
    assert {"prefill", "decode"} <= set(summary)          # the measured generation only
    assert "setup" not in summary
    rec = json.loads(record.read_text())
    assert rec["gen_len"] == 3
    assert rec["traced"] is True and set(rec["trace_summary"]) == set(summary)
    assert rec["decode_graphs"] == "none"                 # graphs need CUDA
    assert rec["trace_summary"]["decode"]["wall"] == pytest.approx(summary["decode"]["wall"], abs=1e-4)
    # the host-side events of the run: without CUDA no copy thread polls and the allocator has
    # no counters; with it, each counter is there
    if torch.cuda.is_available():
        assert set(rec["allocator_events"]) == set(metrics.ALLOCATOR_COUNTERS)
    else:
        assert (rec["copy_polls"], rec["allocator_events"]) == (0, None)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    err = capsys.readouterr().err
    assert "[profile] token 2:" in err and "[trace] decode:" in err


def test_bad_thread_count_exits_2_naming_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    argv = TINY + ["--offload-dir", str(tmp_path / "off"), "--cpu-attention-threads", "0"]
    assert flex_opt.main(argv) == 2
    assert "cpu_attention_threads must be >= 1" in capsys.readouterr().err


def test_bad_disk_io_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        flex_opt.build_parser().parse_args(TINY + ["--disk-io", "fast"])
    assert e.value.code == 2 and "auto" in capsys.readouterr().err


def test_main_keeps_a_users_allocator_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    argv = TINY + ["--offload-dir", str(tmp_path / "off"), "--log-file", str(tmp_path / "log")]
    assert flex_opt.main(argv) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"
