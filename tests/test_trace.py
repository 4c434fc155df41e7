"""flexgen_repro.trace: spans per thread and phase, the summary's busy and wall seconds, the dump,
and a GC pass that starts inside a locked append (it deadlocked the traced OPT-30B run)."""
from __future__ import annotations

import json
import threading
import time

from flexgen_repro import trace


def test_spans_summary_and_dump(tmp_path, monkeypatch):
    monkeypatch.setattr(trace, "PATH", str(tmp_path / "t.json"))
    trace.reset()
    trace.set_phase("decode")
    try:
        with trace.span("work"):
            time.sleep(0.02)
        worker = threading.Thread(target=_sleep_span, args=(0.01,), name="w")
        worker.start()
        worker.join()
        summ = trace.summary()["decode"]
        assert summ["MainThread/work"] >= 0.02 and summ["w/work"] >= 0.01
        assert summ["wall"] >= summ["MainThread/work"]
        trace.dump()
        spans = json.loads((tmp_path / "t.json").read_text())["spans"]
        assert sorted(s[1] for s in spans) == ["MainThread", "w"] and min(s[3] for s in spans) == 0
    finally:
        trace.set_phase("setup")
        trace.reset()


def _sleep_span(seconds):
    with trace.span("work"):
        time.sleep(seconds)


def test_gc_pass_inside_a_locked_append_does_not_deadlock(monkeypatch):
    monkeypatch.setattr(trace, "PATH", "unused.json")
    trace.reset()

    def nested():
        with trace._lock:  # as inside span()'s append, when an allocation starts a GC pass
            trace._on_gc("start", {"generation": 0})
            trace._on_gc("stop", {"generation": 0})
    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "the GC callback blocked on the trace lock"
    assert [s[2] for s in trace._spans] == ["gc0"]
    trace.reset()
