"""Llama-family checkpoints (safetensors single and sharded, .bin single and sharded, untied and
tied output) through prepare-weights, against the model's own state_dict; the manifest and
verification per family; the runtime refuses a damaged folder naming the tensor and the fix.

Tolerance: none. Each file must equal the state_dict tensor rounded to fp16 by torch.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import percent_policy
from flexgen_repro import ExecutionEnv, OptLM, get_model_config
from flexgen_repro.weights import prepare, verify
from flexgen_repro.weights.folder import MANIFEST
from flexgen_repro.weights.layout import expected_tensors, weight_dir
from llama_models import make_hf_llama


def _save(model, folder: str, layout: str) -> None:
    if layout.startswith("safetensors"):
        model.save_pretrained(folder, max_shard_size="20KB" if layout.endswith("sharded") else "5GB")
        return
    os.makedirs(folder, exist_ok=True)   # .bin as older transformers wrote it (keys with model.)
    model.config.save_pretrained(folder)
    sd = model.state_dict()
    if layout == "bin":
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
        return
    keys, weight_map = list(sd), {}
    for i in range(3):
        name = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({k: sd[k].clone() for k in keys[i::3]}, os.path.join(folder, name))
        weight_map.update({k: name for k in keys[i::3]})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_converts_exactly(layout, tie, tmp_path):
    model = make_hf_llama(kind="qwen2", kv_heads=2, tie=tie, seed=3)
    src, root = str(tmp_path / "tiny-qwen2"), str(tmp_path / "w")
    _save(model, src, layout)
    assert prepare.main(model=src, path=root) == 0
    config = get_model_config(src)
    folder = weight_dir(root, config.name)
    expected = {k.removeprefix("model."): t for k, t in model.state_dict().items()}
    if tie:
        del expected["lm_head.weight"]   # tied: the output reads embed_tokens.weight
    assert set(os.listdir(folder)) - {MANIFEST} == set(expected) == set(expected_tensors(config))
    for name, want in expected.items():
        got = np.load(os.path.join(folder, name))
        assert got.dtype == np.float16 and np.array_equal(got, want.half().numpy()), name
    problems, _ = verify.verify_folder(config, folder)
    assert problems == []
    with open(os.path.join(folder, MANIFEST)) as f:
        assert json.load(f)["model"] == "tiny-qwen2"


def test_verify_and_runtime_name_a_missing_tensor_and_the_fix(tmp_path):
    model = make_hf_llama(kind="llama", kv_heads=2, seed=4)
    src, root = str(tmp_path / "tiny-llama"), str(tmp_path / "w")
    model.save_pretrained(src)
    assert prepare.main(model=src, path=root) == 0
    config = get_model_config(src, dtype=np.float32)
    folder = weight_dir(root, config.name)
    os.remove(os.path.join(folder, "layers.1.mlp.up_proj.weight"))
    assert verify.main(model=src, path=root) == 1
    policy = percent_policy((100, 0, 100, 0, 100, 0), gpu_batch_size=1, num_gpu_batches=1)
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        with pytest.raises(ValueError, match="missing: layers.1.mlp.up_proj.weight") as err:
            OptLM(config, env, root, policy)
    assert "invoke prepare-weights" in str(err.value)
    assert prepare.main(model=src, path=root) == 0   # resumes: writes only what is missing
    assert verify.main(model=src, path=root) == 0


def test_a_checkpoint_of_another_shape_is_refused(tmp_path, capsys):
    model = make_hf_llama(kind="llama", kv_heads=2, seed=5)
    src = str(tmp_path / "other")
    model.save_pretrained(src)
    assert prepare.main(model="llama-tiny-gqa", path=str(tmp_path / "w"), source=src) == 2
    assert "is not llama-tiny-gqa" in capsys.readouterr().err


def test_unknown_model_type_names_the_supported_ones(tmp_path, capsys):
    src = tmp_path / "gpt2ish"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert prepare.main(model=str(src), path=str(tmp_path / "w")) == 2
    err = capsys.readouterr().err
    assert "'gpt2'" in err and "llama" in err and "qwen2" in err
