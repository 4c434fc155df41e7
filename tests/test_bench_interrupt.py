"""`invoke bench` as a user meets it: an interrupt stops the running case's whole process group,
removes its partial record (its log stays, marked) and exits 130 (SIGINT) or 143 (SIGTERM); cases
that need a GPU are refused on a machine without one unless --allow-cpu, and a suite whose cases
were all skipped fails saying why; a run writes to a git-ignored run folder; the records' commit is not made
"-dirty" by results/."""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from flexgen_repro.bench import records, runner, suites, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "case,model,prompt_len,gen_len,percent,gpu_batch_size,num_gpu_batches,gpu_mem_gb,timeout_s,note\n"
# a case that starts a grandchild (same process group) and runs for ten minutes
LONG_CASE = r"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""
DRIVER = r"""
import sys
from flexgen_repro.bench import runner, suites
suites_dir, out, pidfile, case_code = sys.argv[1:5]
suites.SUITES_DIR = suites_dir

def build(case, settings, json_file, log_file):
    with open(json_file, "w") as f:
        f.write("{")  # a partial record, as a case killed mid-write leaves
    return [sys.executable, "-c", case_code, pidfile]

def probe(offload_dir):
    return {"hardware": {"cuda_available": True, "gpu_name": "FakeGPU", "gpu_mem_gb": 80.0,
                         "device": "FakeGPU", "ram_gb": 64.0}, "versions": {}}

sys.exit(runner.main("fake", None, out, "_DUMMY_", out + "/offload", build=build, probe=probe))
"""


def _suite(tmp_path, monkeypatch, rows: str):
    folder = tmp_path / "suites"
    folder.mkdir(exist_ok=True)
    (folder / "fake.csv").write_text(HEADER + rows)
    monkeypatch.setattr(suites, "SUITES_DIR", str(folder))
    return str(folder)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_the_case_group_and_keeps_only_its_log(tmp_path, monkeypatch, sig, code):
    suites_dir = _suite(tmp_path, monkeypatch, "long,opt-tiny,32,8,100 0 100 0 100 0,2,1,,900,long\n")
    out, pidfile = str(tmp_path / "out"), str(tmp_path / "pids")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, suites_dir, out, pidfile, LONG_CASE],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(pidfile):
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the case never started"
        time.sleep(0.05)
    with open(pidfile) as f:
        pids = [int(p) for p in f.read().split()]
    driver.send_signal(sig)
    try:
        _, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    deadline = time.monotonic() + 10  # the kernel may take a moment to tear the group down
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), "a process of the case is left behind"
    left = sorted(os.path.relpath(os.path.join(d, f), out)
                  for d, _, files in os.walk(os.path.join(out, "fake")) for f in files)
    # no raw record and no partial child record; the stopped case's log, marked as stopped
    assert left == [os.path.join("fake", "logs", "long.log")], left
    with open(os.path.join(out, "fake", "logs", "long.log")) as f:
        assert f"interrupted ({signal.Signals(sig).name})" in f.read()


def _probe(cuda: bool):
    def probe(offload_dir):
        hw = {"cuda_available": cuda, "gpu_name": "FakeGPU" if cuda else None,
              "gpu_mem_gb": 80.0 if cuda else None, "device": "FakeGPU" if cuda else "cpu (x86_64)",
              "ram_gb": 64.0}
        return {"hardware": hw, "versions": {}}
    return probe


OK_CASE = r"""
import json, sys
json.dump(dict(prefill_latency_s=0.5, decode_latency_s=2.0, decode_throughput=7.0,
               total_throughput=6.4, peak_gpu_mem_gb=0.1, device="cpu"), open(sys.argv[1], "w"))
"""


def _ok_command(case, settings, json_file, log_file):
    return [sys.executable, "-c", OK_CASE, json_file]


def test_gpu_cases_are_refused_without_a_gpu_unless_allowed(tmp_path, monkeypatch, capsys):
    _suite(tmp_path, monkeypatch, "big,opt-tiny,32,8,100 0 100 0 100 0,2,1,16,60,capped\n")
    out = str(tmp_path / "out")
    rc = runner.main("fake", None, out, "_DUMMY_", str(tmp_path / "off"), build=_ok_command,
                     probe=_probe(cuda=False))
    err = capsys.readouterr().err
    assert rc == 1
    assert "every case of fake was skipped" in err and "needs a GPU" in err
    assert "`invoke bench --suite fake --allow-cpu`" in err  # the hint, as it is typed
    (rec,) = tables.load_records(os.path.join(out, "fake"))
    assert rec["status"] == "skipped" and "needs a GPU" in rec["reason"]
    assert runner.main("fake", None, out, "_DUMMY_", str(tmp_path / "off"), build=_ok_command,
                       probe=_probe(cuda=False), allow_cpu=True) == 0
    (rec,) = tables.load_records(os.path.join(out, "fake"))
    assert rec["status"] == "ok" and rec["total_throughput"] == 6.4


def test_a_gpu_case_runs_where_there_is_a_gpu(tmp_path, monkeypatch):
    _suite(tmp_path, monkeypatch, "big,opt-tiny,32,8,100 0 100 0 100 0,2,1,16,60,capped\n")
    out = str(tmp_path / "out")
    assert runner.main("fake", None, out, "_DUMMY_", str(tmp_path / "off"), build=_ok_command,
                       probe=_probe(cuda=True)) == 0


def test_default_output_is_a_run_folder_that_git_ignores(tmp_path, monkeypatch, capsys):
    _suite(tmp_path, monkeypatch, "small,opt-tiny,32,8,100 0 100 0 100 0,2,1,,60,ok\n")
    monkeypatch.chdir(tmp_path)
    assert runner.main("fake", None, None, "_DUMMY_", str(tmp_path / "off"), build=_ok_command,
                       probe=_probe(cuda=False)) == 0
    (run,) = os.listdir(tmp_path / "results" / "runs")
    commit = records.git_state()["commit"]
    assert run.startswith("fake-") and run.endswith(f"-{commit}")
    assert os.path.isfile(tmp_path / "results" / "runs" / run / "fake" / "raw" / "small.json")
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert runner.run_folder("smoke", {"commit": "abc1234"}, when) == \
        os.path.join("results", "runs", "smoke-20260102-030405-abc1234")
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/runs/smoke-x/smoke/raw/a.json"],
                             cwd=ROOT)
    assert ignored.returncode == 0, "results/runs/ must be ignored by git"


def test_results_do_not_make_the_commit_dirty(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEXGEN_REPRO_COMMIT", raising=False)
    repo = str(tmp_path)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                       check=True, capture_output=True)

    git("init", "-q")
    os.makedirs(os.path.join(repo, "results", "smoke"))
    for name in ("code.py", os.path.join("results", "smoke", "smoke.csv")):
        with open(os.path.join(repo, name), "w") as f:
            f.write("one\n")
    git("add", "-A")
    git("commit", "-qm", "first")
    with open(os.path.join(repo, "results", "smoke", "smoke.csv"), "w") as f:
        f.write("rewritten by a publishing run\n")
    state = records.git_state(repo)
    assert state["dirty"] is False and not state["commit"].endswith("-dirty")
    with open(os.path.join(repo, "code.py"), "w") as f:
        f.write("changed\n")
    state = records.git_state(repo)
    assert state["dirty"] is True and state["commit"].endswith("-dirty")
