"""A light timeline of where a run's wall time goes, without device-wide synchronizations.

`FLEXGEN_PROFILE=1` synchronizes the GPU after every layer, which charges copies still in flight
on other streams to the layer that happens to be computing. This trace instead records spans as
they happen on each thread (copy channels include their stream synchronization, the main thread
its waits on futures and its CPU work), so overlapped work shows as overlapped.

Enabled by `FLEXGEN_TRACE=path.json`; `summary()` gives the busy seconds per (phase, thread, span)
and `dump()` writes them plus the raw spans. Disabled, `span` costs one attribute lookup.
"""
from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

PATH = os.environ.get("FLEXGEN_TRACE") or None
_spans: list[tuple[str, str, str, float, float]] = []  # (phase, thread, name, start, stop)
# Reentrant: a GC pass can start inside a locked append (any allocation can trigger one), and its
# callback then records its own span on the same thread; a plain Lock deadlocked there.
_lock = threading.RLock()
phase = "setup"


_gc_start: dict = {}


def _on_gc(event: str, info: dict) -> None:
    """Python's cyclic collector stops every thread: record its passes as "gc" spans."""
    now = time.perf_counter()
    if event == "start":
        _gc_start[threading.get_ident()] = now
    else:
        start = _gc_start.pop(threading.get_ident(), now)
        item = (phase, threading.current_thread().name, f"gc{info.get('generation', '')}", start, now)
        with _lock:
            _spans.append(item)


if PATH is not None:
    gc.callbacks.append(_on_gc)


def enabled() -> bool:
    return PATH is not None


def set_phase(name: str) -> None:
    global phase
    phase = name


@contextmanager
def span(name: str):
    if PATH is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        item = (phase, threading.current_thread().name, name, start, time.perf_counter())
        with _lock:
            _spans.append(item)


def summary() -> dict:
    """{phase: {"thread/span": busy seconds}} plus each phase's wall time (first start to last
    stop) under "wall"."""
    busy: dict = defaultdict(lambda: defaultdict(float))
    bounds: dict = {}
    with _lock:
        spans = list(_spans)
    for ph, thread, name, start, stop in spans:
        busy[ph][f"{thread}/{name}"] += stop - start
        lo, hi = bounds.get(ph, (start, stop))
        bounds[ph] = (min(lo, start), max(hi, stop))
    return {ph: dict(sorted(v.items()), wall=bounds[ph][1] - bounds[ph][0]) for ph, v in busy.items()}


def dump(path: str | None = None) -> None:
    """Write the summary and the spans (times relative to the first span) as JSON."""
    path = path or PATH
    if path is None:
        return
    with _lock:
        spans = list(_spans)
    t0 = min((s[3] for s in spans), default=0.0)
    with open(path, "w") as f:
        json.dump({"summary": summary(),
                   "spans": [[p, t, n, round(a - t0, 6), round(b - t0, 6)] for p, t, n, a, b in spans]},
                  f)


def reset() -> None:
    with _lock:
        _spans.clear()
