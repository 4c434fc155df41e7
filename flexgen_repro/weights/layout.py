"""The weight folder's layout: `<path>/<name>-np/<tensor>` in np.save format, one file per tensor,
named after the Hugging Face key without `model.` (the final layer norm is `decoder.layer_norm.*`).
"""
from __future__ import annotations

import os

from flexgen_repro.config import OptConfig

DEFAULT_WEIGHT_PATH = "~/opt_weights"


def weight_dir(path: str, name: str) -> str:
    """The folder of one model's tensors: `<path>/<name>-np`."""
    return os.path.join(os.path.expanduser(path), f"{name}-np")


def layer_tensor_names(i: int) -> dict[str, str]:
    """Short name -> file name of layer i's tensors."""
    p = f"decoder.layers.{i}."
    names = {}
    for proj in ("q", "k", "v", "out"):
        names[f"w_{proj}"] = f"{p}self_attn.{proj}_proj.weight"
        names[f"b_{proj}"] = f"{p}self_attn.{proj}_proj.bias"
    names.update(w_ln_attn=f"{p}self_attn_layer_norm.weight", b_ln_attn=f"{p}self_attn_layer_norm.bias",
                 w_fc1=f"{p}fc1.weight", b_fc1=f"{p}fc1.bias",
                 w_fc2=f"{p}fc2.weight", b_fc2=f"{p}fc2.bias",
                 w_ln_mlp=f"{p}final_layer_norm.weight", b_ln_mlp=f"{p}final_layer_norm.bias")
    return names


def expected_tensors(config: OptConfig) -> dict[str, tuple[int, ...]]:
    """Every file a complete weight folder holds, with its shape."""
    h, f = config.hidden_size, config.ffn_embed_dim
    shapes = {
        "decoder.embed_tokens.weight": (config.vocab_size, h),
        "decoder.embed_positions.weight": (config.max_seq_len + 2, h),
        "decoder.layer_norm.weight": (h,),
        "decoder.layer_norm.bias": (h,),
    }
    for i in range(config.num_hidden_layers):
        for short, name in layer_tensor_names(i).items():
            if short in ("w_fc1",):
                shape = (f, h)
            elif short == "b_fc1":
                shape = (f,)
            elif short == "w_fc2":
                shape = (h, f)
            elif short.startswith("w_") and short[2:] in ("q", "k", "v", "out"):
                shape = (h, h)
            else:
                shape = (h,)
            shapes[name] = shape
    return shapes


def hf_key_to_file_name(key: str) -> str | None:
    """A Hugging Face OPT state-dict key -> the weight folder's file name (None: not stored)."""
    if key.startswith("model."):
        key = key[len("model."):]
    if key == "lm_head.weight":  # tied to decoder.embed_tokens.weight
        return None
    return key.replace("decoder.final_layer_norm.", "decoder.layer_norm.")
