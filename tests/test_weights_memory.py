"""Peak memory of the metaseq conversion, measured in a fresh process, on two scaled checkpoints of the
992-file layout with different shapes.

The bound asserted: peak RSS increment <= 2 x largest tensor + 24 MiB. Why: the streaming design holds
one glued output tensor plus at most one part-sized (or, for replicated tensors, one same-sized) read
buffer, so 2 x largest; the 24 MiB covers the index of where each parameter lies in 992 files (about
20k small records here) and allocator slack. Both checkpoints are 170-200 MiB of fp16 weights, so the
bound is about a fifth of the model: a conversion that held the model, or a fifth of it, at once
would fail it. The increment is measured conservatively: RSS just before converting, against the
process's high-water RSS after (VmHWM, reset to the current RSS just before converting; Linux only).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flexgen_repro.weights.metaseq_fixture import ScaledOpt, write_checkpoint

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")

MIB = 1 << 20
MEASURE = """
import json, sys
import psutil
from flexgen_repro.weights import convert_metaseq_shards
import flexgen_repro.weights.metaseq, tqdm  # imports done before the baseline

def peak_rss():  # this process's high-water RSS (VmHWM; ru_maxrss would include the parent's, via exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = psutil.Process().memory_info().rss
convert_metaseq_shards(sys.argv[1], sys.argv[2])
print(json.dumps({"increment": peak_rss() - before}))
"""

SHAPES = {
    # 8 layers, hidden 1024: 200 MiB of weights; largest tensors (fc1, fc2, embed) 8 MiB
    "wide": ScaledOpt(layers=8, hidden=1024, heads=16, ffn=4096, vocab=8 * 512, positions=62, seed=5),
    # 12 layers, hidden 768: 170 MiB; largest fc1/fc2 4.5 MiB, 12 heads, another vocab
    "deep": ScaledOpt(layers=12, hidden=768, heads=12, ffn=3072, vocab=8 * 384, positions=126, seed=6),
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_peak_memory_tracks_the_largest_tensor_not_the_model(shape, tmp_path):
    state = write_checkpoint(str(tmp_path / "src"), SHAPES[shape])
    weights = sum(a.nbytes for a in state.values())
    largest = max(a.nbytes for a in state.values())
    del state
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "src"), str(tmp_path / "out-np")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    increment = json.loads(run.stdout.strip().splitlines()[-1])["increment"]
    bound = 2 * largest + 24 * MIB
    print(f"{shape}: weights {weights / MIB:.0f} MiB, largest tensor {largest / MIB:.1f} MiB, "
          f"peak increment {increment / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB")
    assert increment <= bound
    assert bound < weights / 5  # the bound is meaningful: far under the model's size
    assert len(os.listdir(tmp_path / "out-np")) == 1 + 4 + 16 * SHAPES[shape].layers  # + manifest
