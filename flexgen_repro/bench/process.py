"""A benchmark case's process: run in its own process group with its output in a log, stopped as a
whole (the case and everything it started) on a timeout or when the runner itself is interrupted.

`stop_on_signals()` turns SIGINT and SIGTERM into `Interrupted` inside its block (and restores the
previous handlers after it), so the runner can stop the running case's group, remove its partial
outputs and exit with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Iterator

STOP_GRACE_S = 10.0  # SIGINT first, so a case's context managers close its copy threads; then SIGKILL


class Interrupted(Exception):
    """The runner received SIGINT or SIGTERM (`signum`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Interrupted (main thread only; elsewhere the
    block runs unchanged, since Python delivers signals to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop `proc` and every process of its group: SIGINT, up to `grace_s` for it to exit, then
    SIGKILL to whatever of the group is left."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], log_path: str, timeout_s: float, env: dict) -> tuple[int | None, float]:
    """Run `cmd` as the leader of its own process group with stdout and stderr in `log_path`;
    (exit code, or None when it timed out, and the seconds it ran). On Interrupted the group is
    stopped before the exception goes on."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc, grace_s=0)
            rc = None
        except BaseException:
            stop_group(proc)
            raise
        else:
            stop_group(proc, grace_s=0)  # what the case left running in its group
    return rc, time.perf_counter() - start
