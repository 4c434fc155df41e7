"""bench/alternate.py: runtime constants compared in one process, in turns. Variants parse into
checked settings, are applied and restored around each generation, and a run on the CPU gives
every variant the same tokens; bad input exits 2 with the fix."""
from __future__ import annotations

import json
import sys

import pytest

from flexgen_repro.bench import alternate
from flexgen_repro.devices import copy_engine
from flexgen_repro.schedule import steps

TINY = ["--model", "opt-tiny", "--path", "_DUMMY_", "--prompt-len", "8", "--gen-len", "3",
        "--gpu-batch-size", "2", "--num-gpu-batches", "2", "--dtype", "float32", "--verbose", "0",
        "--percent", "0", "100", "0", "100", "100", "0"]


def test_variants_parse_into_checked_settings():
    assert alternate.parse_variant("shipped") == ("shipped", {})
    assert alternate.parse_variant("s:steps.MAX_PENDING_STORES=64, sys.switchinterval=0.0005") == \
        ("s", {"steps.MAX_PENDING_STORES": 64, "sys.switchinterval": 0.0005})
    # unnamed: the text names it; a float constant takes an int
    assert alternate.parse_variant("copy_engine.COPY_POLL_S=0") == \
        ("copy_engine.COPY_POLL_S=0", {"copy_engine.COPY_POLL_S": 0})
    for bad, words in (("x:steps.NOT_THERE=1", "no numeric constant"),
                       ("x:nowhere.CONST=1", "no numeric constant"),
                       ("x:steps.max_pending=1", "not module.CONST"),
                       ("x:steps.MAX_PENDING_STORES=1.5", "is int"),
                       ("x:steps.MAX_PENDING_STORES=two", "not a number"),
                       ("x:steps.MAX_PENDING_STORES", "not module.CONST=value"),
                       ("x:sys.switchinterval=-1", "seconds > 0")):
        with pytest.raises(ValueError, match=words):
            alternate.parse_variant(bad)


def test_settings_are_restored_after_each_turn_even_on_error():
    before, interval = steps.MAX_PENDING_STORES, sys.getswitchinterval()
    settings = {"steps.MAX_PENDING_STORES": before + 7, "sys.switchinterval": 0.002}
    with alternate.applied(settings):
        assert steps.MAX_PENDING_STORES == before + 7
        assert sys.getswitchinterval() == pytest.approx(0.002)
    assert (steps.MAX_PENDING_STORES, sys.getswitchinterval()) == (before, interval)
    with pytest.raises(RuntimeError), alternate.applied(settings):
        raise RuntimeError("a failed generation")
    assert (steps.MAX_PENDING_STORES, sys.getswitchinterval()) == (before, interval)


def test_summary_gives_medians_ranges_and_token_agreement():
    rows = [{"repeat": r, "variant": v, "decode_tok_s": d, "total_tok_s": t, "tokens": tok}
            for r, v, d, t, tok in ((0, "a", 10.0, 5.0, "x"), (0, "b", 12.0, 6.0, "x"),
                                    (1, "a", 14.0, 7.0, "y"), (1, "b", 11.0, 4.0, "z"),
                                    (2, "a", 12.0, 6.0, "w"), (2, "b", 13.0, 8.0, "w"))]
    a, b = alternate.summarize(rows, ["a", "b"])
    assert (a["decode_tok_s"], a["decode_range"], a["total_tok_s"]) == (12.0, [10.0, 14.0], 6.0)
    assert (b["decode_tok_s"], b["total_range"], b["runs"]) == (12.0, [4.0, 8.0], 3)
    assert a["same_tokens"] and not b["same_tokens"]       # the second repeat differs
    assert not a["repeatable"] and not b["repeatable"]     # x, y, w: each varies between repeats
    steady = alternate.summarize([dict(r, tokens="x") for r in rows], ["a", "b"])
    assert all(v["repeatable"] and v["same_tokens"] for v in steady)


def test_a_run_alternates_variants_on_one_setup(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)   # main() sets it
    out = tmp_path / "ab.json"
    before = copy_engine.COPY_IN_FLIGHT
    argv = ["--variant", "shipped", "--variant", "deep:copy_engine.COPY_IN_FLIGHT=5",
            "--repeats", "2", "--json-file", str(out), "--",
            *TINY, "--offload-dir", str(tmp_path / "off")]
    assert alternate.main(argv) == 0
    data = json.loads(out.read_text())
    assert [(r["repeat"], r["variant"]) for r in data["rows"]] == \
        [(0, "shipped"), (0, "deep"), (1, "shipped"), (1, "deep")]
    assert data["variants"] == {"shipped": {}, "deep": {"copy_engine.COPY_IN_FLIGHT": 5}}
    assert all(s["same_tokens"] and s["repeatable"] and s["runs"] == 2 and s["decode_tok_s"] > 0
               for s in data["summary"])
    assert data["argv"] == argv and data["commit"] and data["device"]
    assert copy_engine.COPY_IN_FLIGHT == before
    text = capsys.readouterr().out
    assert "shipped: decode" in text and "deep: decode" in text


@pytest.mark.parametrize("argv,words", [
    (["--variant", "a"], "after `--`"),
    (["--variant", "a", "--variant", "a", "--", *TINY], "names repeat"),
    (["--variant", "a:steps.NOPE=1", "--", *TINY], "no numeric constant"),
    (["--variant", "a", "--repeats", "0", "--", *TINY], "--repeats must be at least 1"),
    (["--variant", "a", "--", *TINY, "--gen-len", "0"], "--gen-len must be at least 1"),
])
def test_bad_input_exits_2_with_the_fix(argv, words, capsys, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert alternate.main(argv) == 2
    assert words in capsys.readouterr().err
