"""The original's step 2 / step 3 entry points, and the other metaseq layouts they accept: a
consolidated singleton `.pt` (what the original step 2 wrote: qkv still fused, k, v, q) and per-part
`reshard-model_part-<K>.pt` files. Exact equality with the generator's fp16 tensors (values are only
moved, never computed)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from flexgen_repro.weights.metaseq_fixture import ScaledOpt, glued_state, split_part, write_checkpoint

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
SPEC = ScaledOpt(layers=2, hidden=32, heads=4, ffn=64, vocab=8 * 6, positions=14, seed=11)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def assert_folder_equals(folder: str, state: dict[str, np.ndarray]) -> None:
    assert set(os.listdir(folder)) == set(state) | {"manifest.json"}
    for name, want in state.items():
        assert np.array_equal(np.load(os.path.join(folder, name)), want), name


def save_parts(state: dict[str, np.ndarray], parts: int, path_of) -> None:
    for k in range(parts):
        model = {n: torch.from_numpy(a.copy()) for n, a in split_part(state, k, parts, SPEC.layers).items()}
        model["decoder.version"] = torch.tensor([3.0])
        torch.save({"model": model, "cfg": {"model": {"decoder_layers": SPEC.layers}}, "extra_state": {},
                    "optimizer_history": [], "args": None}, path_of(k))


def test_step_2_streams_the_992_files_into_the_numpy_folder(tmp_path):
    state = write_checkpoint(str(tmp_path / "shards"), SPEC)
    out = tmp_path / "opt-scaled-np"
    run = run_script("step_2_consolidate_992_shards_to_singleton.py", "--read-prefix",
                     str(tmp_path / "shards" / "checkpoint_last"), "--save-prefix", str(out), "--model", "infer")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 3 is not needed" in run.stdout
    assert_folder_equals(str(out), state)


def test_step_2_checks_the_shards_against_opt_175b_by_default(tmp_path):
    write_checkpoint(str(tmp_path / "shards"), SPEC)
    run = run_script("step_2_consolidate_992_shards_to_singleton.py", "--read-prefix", str(tmp_path / "shards"),
                     "--output-folder", str(tmp_path / "o"))
    assert run.returncode == 2 and "this checkpoint is not opt-175b" in run.stderr


def test_step_3_converts_a_consolidated_singleton(tmp_path):
    state = glued_state(SPEC)
    save_parts(state, 1, lambda k: str(tmp_path / "consolidated.pt"))
    run = run_script("step_3_convert_to_numpy_weights.py", "--ckpt-path", str(tmp_path / "consolidated.pt"),
                     "--output-folder", str(tmp_path / "out-np"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert_folder_equals(str(tmp_path / "out-np"), state)


def test_step_3_glues_reshard_parts(tmp_path):
    state = glued_state(SPEC)
    (tmp_path / "reshard").mkdir()
    save_parts(state, 4, lambda k: str(tmp_path / "reshard" / f"reshard-model_part-{k}.pt"))
    run = run_script("step_3_convert_to_numpy_weights.py", "--ckpt-path", str(tmp_path / "reshard"),
                     "--output-folder", str(tmp_path / "out-np"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert_folder_equals(str(tmp_path / "out-np"), state)


def test_step_3_names_a_folder_it_cannot_read(tmp_path):
    run = run_script("step_3_convert_to_numpy_weights.py", "--ckpt-path", str(tmp_path),
                     "--output-folder", str(tmp_path / "o"))
    assert run.returncode == 2 and "holds neither a Hugging Face checkpoint" in run.stderr
