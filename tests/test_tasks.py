"""The invoke tasks as a user types them: `invoke TASK --help` prints the task's help and exits 0
for every task `invoke --list` shows (a required positional parameter would swallow `--help` as
its value), and a required option left out stops with exit code 2 naming it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _invoke(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _task_names() -> list[str]:
    listing = json.loads(_invoke("--list", "--list-format", "json").stdout)
    return [t["name"].replace("_", "-") for t in listing["tasks"]]


def test_every_task_prints_its_help_and_exits_0():
    names = _task_names()
    assert {"bench", "eval", "policy", "prepare-weights", "setup-nvme", "verify-weights"} <= set(names)
    for name in names:
        done = _invoke(name, "--help")
        assert done.returncode == 0, f"invoke {name} --help: {done.stdout}{done.stderr}"
        assert f"Usage: inv[oke] [--core-opts] {name}" in done.stdout, name


@pytest.mark.parametrize("task,option", [("setup-nvme", "--cloud"), ("prepare-weights", "--model"),
                                         ("verify-weights", "--model"), ("policy", "--model"),
                                         ("eval", "--task")])
def test_a_missing_required_option_is_named(task, option):
    done = _invoke(task)
    assert done.returncode == 2 and f"{option} is required" in done.stderr, done.stderr


def test_eval_and_bench_take_the_flags_their_messages_suggest():
    assert "--tokenizer" in _invoke("eval", "--help").stdout
    bench = _invoke("bench", "--help").stdout
    assert "--allow-cpu" in bench and "--publish" in bench and "results/runs/" in bench
