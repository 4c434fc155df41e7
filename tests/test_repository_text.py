"""No tracked text file talks about how the project was developed: a measured figure is named by
its date, GPU, commit and command, never by a working session, a numbered round, a borrowed
machine, an issue number or a path outside the repository. A small denylist of regular
expressions over every tracked text file (this file excepted: it holds the patterns)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENYLIST = {
    "a working session": re.compile(r'(?i)(?<![_"])\bsessions?\b(?!["_])'),
    "a numbered round": re.compile(r"(?i)\brounds? ?\d+"),
    "a lent or lending machine": re.compile(r"(?i)\b(lent|lending)\b"),
    "an issue number": re.compile(r"(?i)\bissues? ?#?\d+"),
    "a path outside the repository": re.compile(r"/work/|\.\./shared|\bshared/reference"),
    "a development log": re.compile(r"PERF_NOTES|device-runs|scripts/device"),
}
BINARY = (".png", ".gguf", ".npy", ".gz", ".whl", ".so")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return sorted(p for p in out.decode().split("\0")
                  if p and not p.endswith(BINARY) and p != "tests/test_repository_text.py"
                  and os.path.isfile(os.path.join(ROOT, p)))


def _hits(path: str) -> list[str]:
    with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
        text = f.read()
    return [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {what}: {m.group(0)!r}"
            for what, pattern in DENYLIST.items() for m in pattern.finditer(text)]


def test_the_denylist_catches_what_it_should_and_spares_code():
    caught = ["in session 5", "round 38b", "the lent H100", "issue #18", "issue 7's table",
              "../shared/reference/x.csv", "/work/main", "see PERF_NOTES"]
    spared = ["start_new_session=True", '@pytest.fixture(scope="session")', "a rounding error",
              "around 4 ms", "silent", "the issue is", "shared memory"]
    assert all(any(p.search(t) for p in DENYLIST.values()) for t in caught)
    assert not [t for t in spared if any(p.search(t) for p in DENYLIST.values())]


def test_no_tracked_file_carries_development_history():
    hits = [h for p in _tracked() for h in _hits(p)]
    assert hits == [], "\n".join(hits[:50])
