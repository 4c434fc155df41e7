"""The text job over several ranks (torchrun, gloo, CPU): the output file is byte-identical to a
one-process run's (itself checked against transformers in test_text_cli.py); a run with a rank
killed resumes, in one process, to the same bytes; merging and sharding by hand."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from flexgen_repro.generate import main
from flexgen_repro.parallel import shards
from flexgen_repro.parallel.world import World
from flexgen_repro.text.model import TextJobError
from test_text_cli import base_args, policy_flags, write_input
from text_checkpoint import make_text_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny text checkpoint, 24 records, and the one-process output under the disk policy."""
    root = tmp_path_factory.mktemp("distgen")
    ckpt = make_text_checkpoint(str(root / "tiny-text"))
    write_input(root / "in.jsonl", 24)
    flags = [*policy_flags("disk"), "--gpu-batch-size", "1"]
    whole = root / "whole.jsonl"
    assert main(base_args(root, ckpt, whole, *flags)) == 0
    return root, ckpt, flags, whole.read_bytes()


def _torchrun(ranks: int, args: list[str], **popen) -> subprocess.Popen:
    from dist_ranks import free_port
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                             str(ranks), "--master-port", str(free_port()), "-m",
                             "flexgen_repro.generate", *args], env=env, **popen)


def test_invoke_gpus_2_equals_one_process(job, tmp_path):
    """`invoke generate --gpus 2` launches torchrun; one output in input order, parts gone."""
    root, ckpt, flags, whole = job
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        ["invoke", "generate", "--gpus", "2", "--model", ckpt, "--path", str(root / "w"),
         "--input", str(root / "in.jsonl"), "--output", str(out), "--dtype", "float32",
         "--max-new-tokens", "6", "--percent", " ".join(flags[1:7]), "--gpu-batch-size", "1",
         "--offload-dir", str(root / "off")],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == whole
    assert shards.part_files(str(out)) == []
    run = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    assert run["ranks"] == 2 and run["prompts"] == 24
    assert sorted(r["prompts"] for r in run["per_rank"]) == [12, 12]


def test_killed_rank_resumes_in_one_process(job, tmp_path):
    root, ckpt, flags, whole = job
    out = tmp_path / "out.jsonl"
    args = base_args(root, ckpt, out, *flags)
    proc = _torchrun(2, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = tmp_path / "out.jsonl.rank1"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.stat().st_size > 0:
            break
        time.sleep(0.005)
    _kill_local_rank(proc.pid, 1)
    assert proc.wait(timeout=120) != 0
    written = sum(p.read_bytes().count(b"\n") for p in tmp_path.glob("out.jsonl.rank*"))
    assert 0 < written < 24, "the job was not killed mid-way"
    assert not out.exists()
    assert main(args) == 2  # the parts are refused without --resume
    assert main(args + ["--resume"]) == 0  # one process picks up the parts and merges them
    assert out.read_bytes() == whole
    assert shards.part_files(str(out)) == []


def _kill_local_rank(launcher_pid: int, local_rank: int) -> None:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank):
                child.send_signal(signal.SIGKILL)
                return
        except psutil.Error:
            continue
    raise AssertionError(f"no process of local rank {local_rank} under torchrun")


def _line(rid, text="x") -> str:
    return json.dumps({"id": rid, "completion": text}) + "\n"


def test_merge_puts_output_and_parts_in_input_order(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "p"}) + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    out.write_text(_line(0) + _line(3))
    (tmp_path / "out.jsonl.rank0").write_text(_line(4) + _line(1))
    (tmp_path / "out.jsonl.rank2").write_text(_line(5) + _line(2) + '{"id": 9, "compl')  # torn
    assert shards.merge(str(out), str(inp)) == 6
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == list(range(6))
    assert shards.part_files(str(out)) == []


def test_shards_are_round_robin_over_the_records_left(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "p"}) + "\n" for i in range(7)))
    done = {json.dumps(1), json.dumps(4)}
    left = [0, 2, 3, 5, 6]
    for rank in range(2):
        skip = shards.shard_done(str(inp), done, World(rank, 2, rank))
        mine = [i for i in range(7) if json.dumps(i) not in skip]
        assert mine == left[rank::2]


def test_parts_of_a_killed_run_are_refused_without_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.rank1").write_text(_line(1))
    args = argparse.Namespace(output=str(out), resume=False, overwrite=False)
    with pytest.raises(TextJobError, match="--resume"):
        shards.check_parts(args)
    shards.check_parts(argparse.Namespace(output=str(out), resume=True, overwrite=False))
