"""scripts/kernel_resources.py: the fused 4-bit decode matmul compiled ahead of time for sm_90 with
Triton's own tools (no GPU needed; CI runs it with the development lock's triton, in under a minute;
skipped where triton with its CUDA backend is not installed).

triton is looked up, not imported: the script runs in a subprocess, and importing triton here would
fix its flavour for the whole process before tests/test_kernels_gpu.py imports it for the CPU
interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

_TRITON = importlib.util.find_spec("triton")
pytestmark = pytest.mark.skipif(
    _TRITON is None or not any((Path(d) / "backends" / "nvidia" / "__init__.py").is_file()
                               for d in _TRITON.submodule_search_locations or ()),
    reason="needs triton with its CUDA backend (pip install --require-hashes -r requirements-dev.lock)")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kernel_resources.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_the_picked_decode_tiles_do_not_spill_and_32_rows_take_the_64_row_tile(tmp_path):
    """decode_config's promise (no register spills on sm_90) for the row counts decode runs, and
    the 64-row wgmma tile at 32 rows of weights grouped along out, which the sweep shows issuing
    less work per packed byte there than the 32-row tile."""
    out = tmp_path / "resources.json"
    done = run("--rows", "1,32,64,128", "--sweep", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    picked = [r for r in rows if r["picked"]]
    assert {(r["rows"], r["kernel"]) for r in picked} == {
        (m, k) for m in (1, 32, 64, 128) for k in ("rows", "cols")}
    assert all(r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 for r in picked)
    at32 = {(r["BLOCK_M"], r["num_warps"]): r for r in rows if r["rows"] == 32 and r["kernel"] == "rows"}
    chosen = next(r for r in at32.values() if r["picked"])
    assert (chosen["BLOCK_M"], chosen["num_warps"], chosen["matrix_op"]) == (64, 8, "wgmma")
    assert chosen["sass_all_rows"] < at32[(32, 4)]["sass_all_rows"]


def test_bad_rows_exit_2_naming_the_fix():
    done = run("--rows", "1,x")
    assert done.returncode == 2 and "--rows takes whole numbers" in done.stderr
    assert "Traceback" not in done.stderr
