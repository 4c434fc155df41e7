"""flexgen_repro.trace: a run's Tracer records spans per thread and phase while it is active (and
nothing once it is not), the summary's busy and wall seconds, the dump, GC passes recorded only
while active, and a GC pass that starts inside a locked append (it deadlocked a traced run)."""
from __future__ import annotations

import gc
import json
import threading
import time

import pytest

from flexgen_repro import trace
from flexgen_repro.trace import Tracer


def test_spans_summary_and_dump(tmp_path):
    tracer = Tracer(str(tmp_path / "t.json"))
    with tracer.active():
        trace.set_phase("decode")
        with trace.span("work"):
            time.sleep(0.02)
        worker = threading.Thread(target=_sleep_span, args=(0.01,), name="w")
        worker.start()
        worker.join()
    with trace.span("after"):  # no tracer active: recorded nowhere
        pass
    summ = tracer.summary()["decode"]
    assert summ["MainThread/work"] >= 0.02 and summ["w/work"] >= 0.01
    assert summ["wall"] >= summ["MainThread/work"]
    assert "MainThread/after" not in summ
    tracer.dump()
    spans = json.loads((tmp_path / "t.json").read_text())["spans"]
    names = sorted(s[1] for s in spans if not s[2].startswith("gc"))
    assert names == ["MainThread", "w"] and min(s[3] for s in spans) == 0


def _sleep_span(seconds):
    with trace.span("work"):
        time.sleep(seconds)


def test_active_restores_the_previous_tracer_and_gc_callbacks_after_a_failure():
    outer, inner = Tracer(), Tracer()
    callbacks = list(gc.callbacks)
    with outer.active():
        with pytest.raises(RuntimeError):
            with inner.active():
                assert trace.current() is inner
                gc.collect()
                raise RuntimeError("inside")
        assert trace.current() is outer
    assert trace.current() is None and gc.callbacks == callbacks
    assert any(s[2].startswith("gc") for s in inner.spans())


def test_gc_pass_inside_a_locked_append_does_not_deadlock():
    tracer = Tracer()

    def nested():
        with tracer._lock:  # as inside span()'s append, when an allocation starts a GC pass
            tracer.on_gc("start", {"generation": 0})
            tracer.on_gc("stop", {"generation": 0})
    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "the GC callback blocked on the trace lock"
    assert [s[2] for s in tracer.spans()] == ["gc0"]
