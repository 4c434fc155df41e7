"""A light timeline of where a run's wall time goes, without device-wide synchronizations.

RuntimeOptions.profile synchronizes the GPU after every layer, which charges copies still in
flight on other streams to the layer that happens to be computing. A `Tracer` instead records
spans as they happen on each thread (copy channels include their stream synchronization, the main
thread its waits on futures and its CPU work), so overlapped work shows as overlapped.

A run owns its Tracer (OptLM makes one where RuntimeOptions.trace_path is set) and makes it the
active one for the code that records spans (`with tracer.active():`, restored in `finally`);
`span` and `set_phase` below go to the active tracer and cost one lookup where none is.
`summary()` gives the busy seconds per (phase, thread, span) and `dump()` writes them plus the
raw spans.
"""
from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections import defaultdict
from contextlib import contextmanager


class Tracer:
    """Spans (phase, thread, name, start, stop) of one run, and Python's GC passes among them."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.phase = "setup"
        self._spans: list[tuple[str, str, str, float, float]] = []
        # Reentrant: a GC pass can start inside a locked append (any allocation can trigger one),
        # and its callback then records its own span on the same thread; a plain Lock deadlocks.
        self._lock = threading.RLock()
        self._gc_start: dict = {}

    def set_phase(self, name: str) -> None:
        self.phase = name

    def record(self, name: str, start: float, stop: float) -> None:
        item = (self.phase, threading.current_thread().name, name, start, stop)
        with self._lock:
            self._spans.append(item)

    @contextmanager
    def span(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, start, time.perf_counter())

    def on_gc(self, event: str, info: dict) -> None:
        """Python's cyclic collector stops every thread: record its passes as "gc" spans."""
        now = time.perf_counter()
        if event == "start":
            self._gc_start[threading.get_ident()] = now
        else:
            start = self._gc_start.pop(threading.get_ident(), now)
            self.record(f"gc{info.get('generation', '')}", start, now)

    @contextmanager
    def active(self):
        """Make this the tracer that `span` and `set_phase` record into, and follow GC passes;
        the previous tracer and the GC callbacks are restored on exit."""
        global _active
        previous, _active = _active, self
        gc.callbacks.append(self.on_gc)
        try:
            yield self
        finally:
            gc.callbacks.remove(self.on_gc)
            _active = previous

    def spans(self) -> list[tuple[str, str, str, float, float]]:
        with self._lock:
            return list(self._spans)

    def summary(self) -> dict:
        """{phase: {"thread/span": busy seconds}} plus each phase's wall time (first start to last
        stop) under "wall"."""
        busy: dict = defaultdict(lambda: defaultdict(float))
        bounds: dict = {}
        for ph, thread, name, start, stop in self.spans():
            busy[ph][f"{thread}/{name}"] += stop - start
            lo, hi = bounds.get(ph, (start, stop))
            bounds[ph] = (min(lo, start), max(hi, stop))
        return {ph: dict(sorted(v.items()), wall=bounds[ph][1] - bounds[ph][0])
                for ph, v in busy.items()}

    def dump(self, path: str | None = None) -> None:
        """Write the summary and the spans (times relative to the first span) as JSON."""
        path = path or self.path
        if path is None:
            return
        spans = self.spans()
        t0 = min((s[3] for s in spans), default=0.0)
        with open(path, "w") as f:
            json.dump({"summary": self.summary(),
                       "spans": [[p, t, n, round(a - t0, 6), round(b - t0, 6)]
                                 for p, t, n, a, b in spans]}, f)

    def reset(self) -> None:
        with self._lock:
            self._spans.clear()


# The tracer made active by `Tracer.active()` (None outside one): set and restored only there.
_active: Tracer | None = None


def activate(tracer: Tracer | None):
    """`tracer.active()`, or nothing where tracer is None."""
    return tracer.active() if tracer is not None else contextlib.nullcontext()


def current() -> Tracer | None:
    return _active


def span(name: str):
    """A span of the active tracer (nothing where none is active)."""
    tracer = _active
    return tracer.span(name) if tracer is not None else contextlib.nullcontext()


def set_phase(name: str) -> None:
    tracer = _active
    if tracer is not None:
        tracer.set_phase(name)
