"""Copy channels: one background thread (and one CUDA stream where CUDA exists) per kind of
transfer, so weight loads, cache loads and cache stores overlap with compute.

A pipelined job (`Channel.submit(..., pipelined=True)`) has its copies queued by the copy thread,
which moves on to the next job while they are in flight; a waiter thread resolves the jobs'
futures in order as their copies finish, so the link does not idle for the hand-over between jobs.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from flexgen_repro import trace
from flexgen_repro.devices.copy_engine import wait_done


class Channel:
    """One background copy thread (and CUDA stream): jobs run in order; errors reach the caller.

    `submit` returns a Future; `result()` re-raises a failed job's exception in the caller, so a
    failing copy never hangs the run. Without overlap, jobs run inline in the caller. A pipelined
    job's future resolves once the copies it queued are done (its result is ready to use on any
    stream), while the thread has already gone on to the next job.
    """

    def __init__(self, name: str, use_cuda: bool, inline: bool):
        self.name, self.inline = name, inline
        self.stream = torch.cuda.Stream() if use_cuda and not inline else None
        self._pool = None if inline else ThreadPoolExecutor(1, thread_name_prefix=f"copy-{name}")
        self._waiter = None
        if self.stream is not None:
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix=f"done-{name}")

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
        if pipelined and self._waiter is not None:
            outer: Future = Future()
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

    def _issue(self, fn, args, ready, outer: Future) -> None:
        """A pipelined job on the copy thread: queue its copies, hand their end to the waiter."""
        try:
            with trace.span(self.name + "/issue"), torch.cuda.stream(self.stream):
                if ready is not None:
                    self.stream.wait_event(ready)
                out = fn(*args)
                done = torch.cuda.Event()
                done.record(self.stream)
        except BaseException as e:
            outer.set_exception(e)
            return
        self._waiter.submit(self._complete, done, out, outer)

    def _complete(self, done, out, outer: Future) -> None:
        try:
            with trace.span(self.name):
                wait_done(done)
        except BaseException as e:
            outer.set_exception(e)
            return
        outer.set_result(out)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._waiter is not None:  # after the copy thread: it hands jobs to the waiter
            self._waiter.shutdown(wait=True)
            self._waiter = None
