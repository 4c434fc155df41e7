"""End to end: a random transformers OPT saved as a checkpoint (safetensors, sharded .bin, and the
992-file metaseq layout built from the same weights), converted by prepare-weights, then run by OptLM:
greedy tokens must equal OPTForCausalLM.generate(do_sample=False).

Tolerance: none on tokens. The model's weights are rounded through fp16 first (conftest.make_hf_opt),
so the fp16 folder holds them exactly and the float32 runtime computes what transformers computes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import hf_greedy, make_hf_opt, percent_policy, random_prompts
from flexgen_repro import ExecutionEnv, OptLM, get_opt_config
from flexgen_repro.weights import convert_metaseq_shards, prepare
from flexgen_repro.weights.layout import hf_key_to_file_name, weight_dir
from flexgen_repro.weights.metaseq_fixture import spec_of, write_checkpoint
from test_weights_hf import save_sharded_bin

GEN = 8
# weights, cache and activations split over GPU (host-backed without CUDA), CPU and disk: the folder's
# tensors are read into every tier (the runtime's own tests cover the placement matrix)
POLICY = percent_policy((30, 30, 30, 30, 30, 30))


def write_source(model, kind: str, ckpt: str, weights: str) -> None:
    if kind == "safetensors":
        model.save_pretrained(ckpt)
        assert prepare.main(model=ckpt, path=weights) == 0
    elif kind == "bin-sharded":
        save_sharded_bin(model, ckpt)
        assert prepare.main(model=ckpt, path=weights) == 0
    else:  # metaseq: the same weights cut into 8 parts x 124 FSDP ranks
        model.config.save_pretrained(ckpt)
        state = {hf_key_to_file_name(k): v.detach().half().numpy() for k, v in model.state_dict().items()
                 if hf_key_to_file_name(k)}
        write_checkpoint(ckpt + "-shards", spec_of(state, heads=model.config.num_attention_heads), state)
        config = get_opt_config(ckpt)
        convert_metaseq_shards(ckpt + "-shards", weight_dir(weights, config.name), config=config)


@pytest.mark.parametrize("kind", ["safetensors", "bin-sharded", "metaseq-992"])
def test_converted_weights_generate_like_transformers(kind, tmp_path):
    model = make_hf_opt(hidden=32, layers=2, heads=4, ffn=64, vocab=128, seed=7)
    ckpt, weights = str(tmp_path / "tiny-opt"), str(tmp_path / "weights")
    write_source(model, kind, ckpt, weights)
    config = get_opt_config(ckpt, dtype=np.float32)
    prompts = random_prompts(5, 7, config.vocab_size, seed=3, pad_rows=2)
    expected = hf_greedy(model, prompts, GEN)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        out = OptLM(config, env, weights, POLICY).generate(prompts, max_new_tokens=GEN)
    np.testing.assert_array_equal(out, expected, err_msg=kind)


def test_runtime_refuses_a_damaged_folder_naming_the_tensor_and_the_fix(tmp_path):
    model = make_hf_opt(hidden=32, layers=2, heads=4, ffn=64, vocab=128, seed=8)
    ckpt, weights = str(tmp_path / "tiny-opt"), str(tmp_path / "weights")
    write_source(model, "safetensors", ckpt, weights)
    config = get_opt_config(ckpt, dtype=np.float32)
    folder = weight_dir(weights, config.name)
    os.remove(os.path.join(folder, "decoder.layers.1.fc1.bias"))
    policy = percent_policy((100, 0, 100, 0, 100, 0), gpu_batch_size=1, num_gpu_batches=1)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        with pytest.raises(ValueError, match="missing: decoder.layers.1.fc1.bias") as err:
            OptLM(config, env, weights, policy)
    assert "invoke prepare-weights" in str(err.value)
    assert prepare.main(model=ckpt, path=weights) == 0  # the rerun writes only what is missing
    assert os.path.exists(os.path.join(folder, "decoder.layers.1.fc1.bias"))
