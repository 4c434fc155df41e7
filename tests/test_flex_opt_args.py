"""flex_opt's command line as a user meets it: every argument is checked before any weight is read
(exit code 2, the fix named, no traceback), and a run writes no file unless asked (--log-file,
--json-file)."""
from __future__ import annotations

import json
import os

import pytest

from flexgen_repro import flex_opt


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a run gets as far as building the environment or reading weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was about to be read before the arguments were checked")
    monkeypatch.setattr(flex_opt.ExecutionEnv, "create", refuse)
    monkeypatch.setattr(flex_opt, "OptLM", refuse)


@pytest.mark.parametrize("flags,message", [
    (["--prompt-len", "2040", "--gen-len", "32"], "exceeds opt-125m's 2048 positions"),
    (["--prompt-len", "0"], "--prompt-len must be at least 1"),
    (["--gen-len", "0"], "--gen-len must be at least 1"),
    (["--gpu-batch-size", "0"], "--gpu-batch-size must be at least 1"),
    (["--gpu-mem-gb", "-1"], "--gpu-mem-gb must be > 0"),
    (["--percent", "60", "50", "100", "0", "100", "0"], "w_"),
    (["--path", "/nonexistent/weights"], "invoke prepare-weights --model opt-125m"),
    (["--json-file", "/nonexistent/dir/r.json"], "does not exist"),
])
def test_bad_arguments_exit_2_before_any_weight_is_read(no_weights, capsys, flags, message):
    argv = ["--model", "opt-125m", "--path", "_DUMMY_", *flags]
    assert flex_opt.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_model_exits_2_naming_the_choices(no_weights, capsys):
    assert flex_opt.main(["--model", "opt-7b", "--path", "_DUMMY_"]) == 2
    assert "opt-6.7b" in capsys.readouterr().err


def test_a_run_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["--model", "opt-tiny", "--path", "_DUMMY_", "--offload-dir", str(tmp_path / "off"),
            "--prompt-len", "8", "--gen-len", "3", "--gpu-batch-size", "2", "--verbose", "0"]
    assert flex_opt.main(base) == 0
    assert [f for f in os.listdir(tmp_path) if f != "off"] == []  # no log file in the current folder
    assert flex_opt.main([*base, "--log-file", "run.log", "--json-file", "run.json"]) == 0
    assert "throughput" in (tmp_path / "run.log").read_text()
    assert json.loads((tmp_path / "run.json").read_text())["gen_len"] == 3
