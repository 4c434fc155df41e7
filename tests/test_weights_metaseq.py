"""metaseq's 992-file OPT-175B layout, scaled down: the generator's files read like the real ones, and
conversion reproduces, bit for bit, the glued tensors the generator started from.

Tolerance: none. Conversion only moves fp16 values (un-flatten, glue, write), so every tensor must be
exactly equal to the generator's fp16 tensor.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from flexgen_repro.config import get_opt_config
from flexgen_repro.weights import convert_metaseq_shards, folder as folder_mod, torchzip, verify
from flexgen_repro.weights.folder import MANIFEST, PARTIAL, WeightsError
from flexgen_repro.weights.metaseq import infer_config, index_source, output_plan
from flexgen_repro.weights.metaseq_fixture import ScaledOpt, shard_file_name, write_checkpoint

SMALL = ScaledOpt(layers=2, hidden=64, heads=4, ffn=256, vocab=8 * 16, positions=30, seed=1)
# Flat parameters smaller than the 124 ranks: most ranks hold only padding, as for small FSDP modules.
SLIVER = ScaledOpt(layers=3, hidden=8, heads=2, ffn=16, vocab=8 * 3, positions=6, seed=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    src = tmp_path_factory.mktemp("small-shards")
    return str(src), write_checkpoint(str(src), SMALL)


def assert_folder_equals(folder: str, state: dict[str, np.ndarray]) -> None:
    for name, want in state.items():
        got = np.load(os.path.join(folder, name))  # the exact name: no .npy suffix
        assert got.dtype == np.float16 and got.shape == want.shape, name
        assert np.array_equal(got, want), f"{name} differs from the generator's glued tensor"


def test_fixture_has_the_release_layout(small):
    src, _ = small
    names = set(os.listdir(src))
    assert len(names) == 992
    assert {shard_file_name(k, n) for k in range(8) for n in range(124)} == names
    ckpt = torch.load(os.path.join(src, shard_file_name(3, 77)), weights_only=False)
    assert set(ckpt) == {"model", "shard_metadata", "cfg", "extra_state", "optimizer_history", "args"}
    meta = ckpt["shard_metadata"]
    assert meta["buffer_names"] == ["decoder.version"]
    assert [m["fsdp_path"] for m in meta["param_metadata"]] == [""] + [f"decoder.layers.{i}" for i in range(2)]
    info = meta["param_metadata"][1]["params"]["flat_param_0"]
    assert set(info) == {"names", "shapes", "numels", "padding"}
    assert info["names"][0] == "self_attn.qkv_proj.weight" and tuple(info["shapes"][0]) == (3 * 64 // 8, 64)
    assert meta["param_metadata"][0]["shared_param_info"] == [("decoder.embed_tokens.weight",
                                                               "decoder.output_projection.weight")]


def test_reader_matches_torch_load_without_importing_classes(small):
    src, _ = small
    path = os.path.join(src, shard_file_name(5, 123))  # the last rank: it carries the padding
    ours, theirs = torchzip.load(path), torch.load(path, weights_only=False)
    assert ours["model"].keys() == theirs["model"].keys()
    for key, ref in ours["model"].items():
        assert np.array_equal(ref.array(), theirs["model"][key].numpy()), key
    assert ours["shard_metadata"]["param_metadata"][2]["params"]["flat_param_0"]["padding"] == \
        theirs["shard_metadata"]["param_metadata"][2]["params"]["flat_param_0"]["padding"]
    # the config class is never imported: the reader keeps an inert stand-in with its state
    assert type(ours["cfg"]).__name__ == "FixtureConfig" and not hasattr(ours["cfg"], "model")
    assert ours["cfg"].state["model"]["decoder_layers"] == SMALL.layers


def test_conversion_is_exact_and_writes_a_verified_folder(small, tmp_path):
    src, state = small
    out = convert_metaseq_shards(src, str(tmp_path / "opt-scaled-np"))
    assert_folder_equals(out, state)
    config = infer_config(output_plan(index_source(src)), "opt-scaled")
    assert set(os.listdir(out)) == set(state) | {MANIFEST}
    problems, notes = verify.verify_folder(config, out)
    assert problems == [] and notes == []
    verify.check_folder(config, out)


@pytest.mark.parametrize("spec", [SLIVER, ScaledOpt(layers=1, hidden=96, heads=6, ffn=192, vocab=8 * 20,
                                                    positions=10, seed=3, optimizer_state=True)],
                         ids=["sliver-shards", "with-optimizer-state"])
def test_other_shapes_convert_exactly(spec, tmp_path):
    state = write_checkpoint(str(tmp_path / "src"), spec)
    out = convert_metaseq_shards(str(tmp_path / "src"), str(tmp_path / "out" / "x-np"))
    assert_folder_equals(out, state)


def test_config_is_checked_against_the_shards(small, tmp_path):
    src, _ = small
    with pytest.raises(WeightsError, match="not opt-125m") as err:
        convert_metaseq_shards(src, str(tmp_path / "o"), config=get_opt_config("opt-125m"))
    assert "decoder.embed_tokens.weight" in str(err.value)


def test_missing_and_unreadable_shards_are_named(small, tmp_path):
    src, _ = small
    broken = tmp_path / "broken"
    broken.mkdir()
    for entry in os.listdir(src):
        os.symlink(os.path.join(src, entry), broken / entry)
    os.remove(broken / shard_file_name(2, 17))
    missing = r"lacks 1 of the 992 shard files: checkpoint_last-model_part-2-shard17\.pt"
    with pytest.raises(WeightsError, match=missing):
        convert_metaseq_shards(str(broken), str(tmp_path / "o1"))
    (broken / shard_file_name(2, 17)).write_bytes(b"not a checkpoint")
    os.remove(broken / shard_file_name(6, 3))
    with open(os.path.join(src, shard_file_name(6, 3)), "rb") as f:
        (broken / shard_file_name(6, 3)).write_bytes(f.read()[:300])  # truncated download
    with pytest.raises(WeightsError) as err:
        convert_metaseq_shards(str(broken), str(tmp_path / "o2"))
    assert "2 problems" in str(err.value)
    assert shard_file_name(2, 17) in str(err.value) and shard_file_name(6, 3) in str(err.value)


def test_not_enough_disk_is_refused_before_writing(small, tmp_path, monkeypatch):
    src, _ = small

    class Tiny:
        free = 1000

    monkeypatch.setattr(folder_mod.shutil, "disk_usage", lambda path: Tiny())
    with pytest.raises(WeightsError, match="not enough disk space"):
        convert_metaseq_shards(src, str(tmp_path / "x-np"))
    assert os.listdir(tmp_path / "x-np") == []


def test_interrupted_conversion_resumes_and_skips_finished_tensors(small, tmp_path, monkeypatch):
    src, state = small
    out = str(tmp_path / "x-np")
    real_write, calls = folder_mod.write_npy, []

    def crash_on_fifth(path, arr):
        calls.append(os.path.basename(path))
        if len(calls) == 5:  # die half-way through writing the fifth file
            with open(os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp-1"), "wb") as f:
                f.write(b"\x93NUMPY half")
            raise KeyboardInterrupt
        return real_write(path, arr)

    monkeypatch.setattr(folder_mod, "write_npy", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        convert_metaseq_shards(src, out)
    finished = calls[:4]
    assert sorted(os.listdir(out)) == sorted(finished + [PARTIAL, "." + calls[4] + ".tmp-1"])
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in finished}

    calls.clear()
    monkeypatch.setattr(folder_mod, "write_npy", lambda path, arr: calls.append(os.path.basename(path))
                        or real_write(path, arr))
    convert_metaseq_shards(src, out)
    assert len(calls) == len(state) - 4 and not set(calls) & set(finished)
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in finished} == stamps
    assert set(os.listdir(out)) == set(state) | {MANIFEST}
    assert_folder_equals(out, state)

    calls.clear()
    convert_metaseq_shards(src, out)  # a complete folder: nothing to do
    assert calls == []


class _Payload:
    """Pickles as a call to os.system: torch.load(weights_only=False) would run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_reader_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(2)}, "cfg": _Payload(str(marker))}, tmp_path / "evil.pt")
    ckpt = torchzip.load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    assert np.array_equal(ckpt["model"]["w"].array(), np.ones(2, np.float32))
    assert type(ckpt["cfg"]).__name__ == "system" and ckpt["cfg"].args == (f"touch {marker}",)
