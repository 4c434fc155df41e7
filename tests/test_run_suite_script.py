"""scripts/run_suite_on_gpu.sh: runs a named suite with the given commit stamped on its records (a
copy of the tree without .git) and packs the records, tables and logs into one tarball."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_script_runs_a_suite_into_one_tarball_with_the_commit_stamped(tmp_path):
    tarball = tmp_path / "smoke.tar.gz"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_suite_on_gpu.sh"), "smoke",
                           "abc1234", str(tarball), "--", "--cases", "wcpu-overlap-1",
                           "--offload-dir", str(tmp_path / "offload")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        record = json.load(tar.extractfile("./smoke/raw/wcpu-overlap-1.json"))
    assert {"./smoke/smoke.csv", "./smoke/smoke.md", "./smoke/logs/wcpu-overlap-1.log"} <= set(names)
    assert record["status"] == "ok" and record["commit"] == "abc1234"


def test_script_names_its_usage():
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_suite_on_gpu.sh")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "usage: scripts/run_suite_on_gpu.sh SUITE COMMIT" in done.stderr
