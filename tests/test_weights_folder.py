"""The weight folder: exact-name np.save files written atomically, compatible both ways with the
original FlexGen's folders; the fast header check the runtime calls; verify-weights with the manifest.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from flexgen_repro.config import get_opt_config
from flexgen_repro.weights import verify
from flexgen_repro.weights.folder import MANIFEST, PARTIAL, WeightFolder, file_checksum, read_header, write_npy
from flexgen_repro.weights.layout import expected_tensors, weight_dir

TINY = get_opt_config("opt-tiny")


def original_flexgen_folder(path: str, config=TINY, seed: int = 0) -> dict[str, np.ndarray]:
    """A folder as the original FlexGen writes it: np.save through an open file, no manifest."""
    rng = np.random.default_rng(seed)
    folder = weight_dir(path, config.name)
    os.makedirs(folder)
    state = {}
    for name, shape in expected_tensors(config).items():
        state[name] = rng.standard_normal(shape).astype(np.float16)
        with open(os.path.join(folder, name), "wb") as f:
            np.save(f, state[name])
    return state


def test_write_npy_uses_the_exact_name_and_np_save_format(tmp_path):
    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    digest = write_npy(str(tmp_path / "decoder.layers.0.fc1.weight"), arr)
    assert os.listdir(tmp_path) == ["decoder.layers.0.fc1.weight"]
    with open(tmp_path / "decoder.layers.0.fc1.weight", "rb") as f:
        ours = f.read()
    with open(tmp_path / "ref", "wb") as f:
        np.save(f, arr)
    assert ours == (tmp_path / "ref").read_bytes()  # byte-identical to what the original writes
    header = read_header(str(tmp_path / "ref"))
    assert (header.shape, header.dtype, header.truncated) == ((3, 4), np.float16, False)
    assert file_checksum(str(tmp_path / "ref")) == digest


def test_original_flexgen_folder_passes_and_reads_back(tmp_path):
    state = original_flexgen_folder(str(tmp_path))
    folder = weight_dir(str(tmp_path), TINY.name)
    verify.check_folder(TINY, folder)
    problems, notes = verify.verify_folder(TINY, folder)
    assert problems == [] and "no manifest.json" in notes[0]
    assert verify.main(TINY.name, str(tmp_path)) == 0


def test_check_folder_names_every_problem_and_the_fix(tmp_path):
    original_flexgen_folder(str(tmp_path))
    folder = weight_dir(str(tmp_path), TINY.name)
    os.remove(os.path.join(folder, "decoder.layers.1.fc2.bias"))
    with open(os.path.join(folder, "decoder.layers.0.fc1.weight"), "wb") as f:
        np.save(f, np.zeros((3, 3), np.float16))
    path = os.path.join(folder, "decoder.embed_tokens.weight")
    os.truncate(path, os.path.getsize(path) - 10)
    with open(os.path.join(folder, "decoder.layer_norm.bias"), "wb") as f:
        np.save(f, np.zeros(TINY.hidden_size, np.int32))
    with pytest.raises(ValueError) as err:
        verify.check_folder(TINY, folder)
    msg = str(err.value)
    assert "(4 problems)" in msg
    assert "missing: decoder.layers.1.fc2.bias" in msg
    assert "wrong shape: decoder.layers.0.fc1.weight is (3, 3), opt-tiny needs (256, 64)" in msg
    assert "truncated: decoder.embed_tokens.weight" in msg
    assert "wrong dtype: decoder.layer_norm.bias is int32" in msg
    assert f"invoke prepare-weights --model opt-tiny --path {tmp_path}" in msg
    with pytest.raises(ValueError, match="no weight folder at"):
        verify.check_folder(TINY, str(tmp_path / "nowhere-np"))


def test_check_folder_reads_headers_only(tmp_path):
    config = get_opt_config("opt-175b")  # 1,540 tensors; writing them empty-headed keeps this fast
    folder = weight_dir(str(tmp_path), config.name)
    os.makedirs(folder)
    for name, shape in expected_tensors(config).items():
        with open(os.path.join(folder, name), "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": shape})
            f.truncate(f.tell() + 2 * int(np.prod(shape)))  # sparse file: the size is right, no data written
    start = time.perf_counter()
    verify.check_folder(config, folder)
    assert time.perf_counter() - start < 2.0  # reading 325 GiB of data would take minutes


def test_verify_uses_the_manifest_and_checksums(tmp_path, capsys):
    rng = np.random.default_rng(1)
    folder = weight_dir(str(tmp_path), TINY.name)
    expected = expected_tensors(TINY)
    writer = WeightFolder(folder, expected, model=TINY.name, source="test")
    for name, shape in expected.items():
        writer.write(name, rng.standard_normal(shape).astype(np.float16))
    assert os.path.exists(os.path.join(folder, PARTIAL))
    assert verify.main(TINY.name, str(tmp_path)) == 1  # not finished yet
    writer.finish()
    assert not os.path.exists(os.path.join(folder, PARTIAL)) and os.path.exists(os.path.join(folder, MANIFEST))
    assert verify.main(TINY.name, str(tmp_path)) == 0
    path = os.path.join(folder, "decoder.layers.1.self_attn.q_proj.weight")
    with open(path, "r+b") as f:  # flip one data byte: shapes still fine, the checksum is not
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    verify.check_folder(TINY, folder)  # the fast check cannot see it...
    capsys.readouterr()
    assert verify.main(TINY.name, str(tmp_path)) == 1  # ...verify-weights does
    err = capsys.readouterr().err
    assert "checksum mismatch: decoder.layers.1.self_attn.q_proj.weight" in err and "prepare-weights" in err


def test_writer_rejects_wrong_shapes_and_reports_missing_tensors(tmp_path):
    expected = expected_tensors(TINY)
    writer = WeightFolder(str(tmp_path / "x-np"), expected, model=TINY.name, source="test")
    with pytest.raises(ValueError, match="expected float16"):
        writer.write("decoder.layer_norm.bias", np.zeros(3, np.float16))
    writer.write("decoder.layer_norm.bias", np.zeros(TINY.hidden_size, np.float16))
    with pytest.raises(ValueError, match=f"lacks {len(expected) - 1} tensors"):
        writer.finish()
    again = WeightFolder(str(tmp_path / "x-np"), expected, model=TINY.name, source="test")
    assert again.done("decoder.layer_norm.bias") and len(again.pending()) == len(expected) - 1


def test_verify_main_unknown_model(tmp_path, capsys):
    assert verify.main("opt-9b", str(tmp_path)) == 2
    assert "unknown model 'opt-9b'" in capsys.readouterr().err


def test_finished_tensors_are_trusted_only_for_the_same_source(tmp_path):
    expected = expected_tensors(TINY)
    folder = str(tmp_path / "x-np")
    first = WeightFolder(folder, expected, model=TINY.name, source="/ckpt/a")
    for name, shape in expected.items():
        first.write(name, np.zeros(shape, np.float16))
    first.finish()
    assert WeightFolder(folder, expected, model=TINY.name, source="/ckpt/a").pending() == []
    # another checkpoint of the same shapes converted into the same folder: everything is rewritten
    assert WeightFolder(folder, expected, model=TINY.name, source="/ckpt/b").pending() == list(expected)
