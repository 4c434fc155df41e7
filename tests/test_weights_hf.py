"""Hugging Face OPT checkpoints (safetensors single and sharded, sharded .bin) through
`prepare-weights`, compared with the model's own state_dict; hub download paths with the hub mocked or
offline; the user-facing errors.

Tolerance: none. The folder holds fp16, so each tensor must equal the state_dict tensor rounded to fp16
by torch (round to nearest even), exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flexgen_repro.weights import hf, prepare
from flexgen_repro.weights.folder import MANIFEST
from flexgen_repro.weights.layout import hf_key_to_file_name

transformers = pytest.importorskip("transformers")


def tiny_opt(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                 vocab_size=1000, max_position_embeddings=64, word_embed_proj_dim=64)
    return transformers.OPTForCausalLM(cfg).eval()


def save_sharded_bin(model, folder: str, shards: int = 3, prefix: str = "") -> None:
    """The .bin layout older transformers wrote: pytorch_model-0000K-of-0000N.bin plus an index
    (keys without `model.`, as in the original facebook/opt checkpoints)."""
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    sd = {k.removeprefix("model."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k].clone() for k in keys[i::shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}, f)


def assert_matches_state_dict(folder: str, model) -> None:
    written = set(os.listdir(folder)) - {MANIFEST}
    expected = {}
    for key, tensor in model.state_dict().items():
        name = hf_key_to_file_name(key)
        if name is not None:
            expected[name] = tensor.detach().to(torch.float16).numpy()
    assert written == set(expected)
    for name, want in expected.items():
        got = np.load(os.path.join(folder, name))
        assert got.dtype == np.float16 and np.array_equal(got, want), name


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin-sharded"])
def test_local_checkpoint_converts_exactly(layout, tmp_path, capsys):
    model = tiny_opt()
    src = str(tmp_path / "tiny-opt")
    if layout == "bin-sharded":
        save_sharded_bin(model, src)
    else:
        model.save_pretrained(src, max_shard_size="60KB" if layout.endswith("sharded") else "5GB")
    kind, files = hf.checkpoint_files(src)
    assert kind == layout.split("-")[0] and (len(files) > 1) == layout.endswith("sharded")
    assert prepare.main(model=src, path=str(tmp_path / "weights")) == 0
    folder = str(tmp_path / "weights" / "tiny-opt-np")
    assert_matches_state_dict(folder, model)
    assert "weights ready" in capsys.readouterr().out


def test_name_plus_source_must_match_the_named_model(tmp_path, capsys):
    src = str(tmp_path / "ckpt")
    tiny_opt().save_pretrained(src)
    assert prepare.main(model="opt-125m", path=str(tmp_path / "w"), source=src) == 2
    err = capsys.readouterr().err
    assert "is not opt-125m" in err and "hidden_size 64 (expected 768)" in err


def test_download_prefers_safetensors_then_falls_back_to_bin(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    bin_dir = str(tmp_path / "snap-bin")
    save_sharded_bin(tiny_opt(), bin_dir)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        if "*.safetensors" in allow_patterns:  # this repo has no safetensors: only config.json comes
            os.makedirs(tmp_path / "snap-st", exist_ok=True)
            return str(tmp_path / "snap-st")
        return bin_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    config = prepare.get_model_config("opt-1.3b")
    assert hf.download(config) == bin_dir
    assert calls == [("facebook/opt-1.3b", tuple(hf.SAFETENSORS_PATTERNS)),
                     ("facebook/opt-1.3b", tuple(hf.BIN_PATTERNS))]
    # the downloaded folder then goes through the same shape check as --source
    assert prepare.main(model="opt-1.3b", path=str(tmp_path / "w")) == 2
    assert f"{bin_dir} is not opt-1.3b" in capsys.readouterr().err


def test_offline_download_says_to_pass_source(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH=os.pathsep.join(sys.path))
    code = ("import sys; from flexgen_repro.weights import prepare; "
            f"sys.exit(prepare.main(model='facebook/opt-125m', path={str(tmp_path / 'w')!r}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "cannot download facebook/opt-125m" in run.stderr and "--source DIR" in run.stderr


@pytest.mark.parametrize("model, source, message", [
    ("opt-7b", None, "unknown model 'opt-7b': choose one of"),
    ("opt-175b", None, "pass --source DIR_WITH_THE_992_FILES"),
    ("opt-tiny", None, "dummy weights only"),
    ("opt-1.3b", "/nonexistent/ckpt", "source /nonexistent/ckpt does not exist"),
])
def test_user_errors_are_clear(model, source, message, tmp_path, capsys):
    assert prepare.main(model=model, path=str(tmp_path), source=source) == 2
    assert message in capsys.readouterr().err


def test_folder_without_weights_is_named(tmp_path, capsys):
    src = tmp_path / "empty-ckpt"
    src.mkdir()
    tiny_opt().config.save_pretrained(src)
    assert prepare.main(model=str(src), path=str(tmp_path / "w")) == 2
    assert "holds no model.safetensors" in capsys.readouterr().err
