"""Copy channels: one background thread (and one CUDA stream where CUDA exists) per kind of
transfer, so weight loads, cache loads and cache stores overlap with compute.

A pipelined job (`Channel.submit(..., pipelined=True)`) has its copies queued by the copy thread,
which moves on to the next job while they are in flight; its future resolves once they are queued,
and taking its result orders the caller's CUDA stream after them (an event the GPU waits on), so
neither the link nor the thread that queues compute idles for the hand-over between jobs.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from flexgen_repro import trace
from flexgen_repro.devices.copy_engine import wait_done

# Pipelined jobs of one channel with copies in flight at a time (a layer's weights loading while
# the next is queued, as the block schedule overlaps them)
PIPELINE_DEPTH = 2


class StreamFuture(Future):
    """A pipelined job's future: set once the job's copies are queued. `result()` (on the thread
    that queues compute) makes the current CUDA stream wait for them, without a host wait."""

    done_event = None

    def result(self, timeout=None):
        out = super().result(timeout)
        torch.cuda.current_stream().wait_event(self.done_event)
        return out


class Channel:
    """One background copy thread (and CUDA stream): jobs run in order; errors reach the caller.

    `submit` returns a Future; `result()` re-raises a failed job's exception in the caller, so a
    failing copy never hangs the run. Without overlap, jobs run inline in the caller. A pipelined
    job's result is for the GPU: `result()` makes the caller's current stream wait for the copies
    the job queued (the host does not wait for them), so what the job returns must be GPU tensors,
    or host values complete when it returns. At most PIPELINE_DEPTH pipelined jobs have copies in
    flight: the thread waits for the oldest before queueing more, which bounds the memory the loads
    ahead of compute hold.
    """

    def __init__(self, name: str, use_cuda: bool, inline: bool):
        self.name, self.inline = name, inline
        self.stream = torch.cuda.Stream() if use_cuda and not inline else None
        self._pool = None if inline else ThreadPoolExecutor(1, thread_name_prefix=f"copy-{name}")
        self._in_flight: deque = deque()   # done events of the pipelined jobs queued last

    def submit(self, fn, *args, pipelined: bool = False, after_compute: bool = True) -> Future:
        """Queue `fn(*args)`. Its copies start after the work queued on the compute stream so far
        (`after_compute`: what the job reads may be compute's output), or at once where the job
        reads only what earlier jobs wrote and the caller orders it after them (a cache load
        after its last store)."""
        if self.inline:
            fut: Future = Future()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # surfaced by result(), like a threaded job
                fut.set_exception(e)
            return fut
        ready = None
        if self.stream is not None and after_compute:  # the job sees what compute has produced
            ready = torch.cuda.Event()
            ready.record()
        if pipelined and self.stream is not None:
            outer = StreamFuture()
            self._pool.submit(self._issue, fn, args, ready, outer)
            return outer
        return self._pool.submit(self._run, fn, args, ready)

    def _run(self, fn, args, ready):
        with trace.span(self.name):
            if self.stream is None:
                return fn(*args)
            with torch.cuda.stream(self.stream):
                if ready is not None:
                    self.stream.wait_event(ready)
                out = fn(*args)
            wait_done(self.stream)
            return out

    def _issue(self, fn, args, ready, outer: StreamFuture) -> None:
        """A pipelined job on the copy thread: queue its copies, resolve its future with their end."""
        try:
            while len(self._in_flight) >= PIPELINE_DEPTH:
                wait_done(self._in_flight.popleft())
            with trace.span(self.name + "/queue"), torch.cuda.stream(self.stream):
                if ready is not None:
                    self.stream.wait_event(ready)
                out = fn(*args)
                done = torch.cuda.Event()
                done.record(self.stream)
        except BaseException as e:
            outer.set_exception(e)
            return
        self._in_flight.append(done)
        outer.done_event = done
        outer.set_result(out)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        while self._in_flight:
            wait_done(self._in_flight.popleft())
