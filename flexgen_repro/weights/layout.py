"""The weight folder's layout: `<path>/<name>-np/<tensor>` in np.save format, one file per tensor,
named after the Hugging Face key without `model.` (OPT's final layer norm is `decoder.layer_norm.*`;
an untied Llama-family output projection is `lm_head.weight`). Names and shapes per family come
from model/families.py; docs/weights.md lists them.
"""
from __future__ import annotations

import os

from flexgen_repro.model import families

DEFAULT_WEIGHT_PATH = "~/opt_weights"


def weight_dir(path: str, name: str) -> str:
    """The folder of one model's tensors: `<path>/<name>-np`."""
    return os.path.join(os.path.expanduser(path), f"{name}-np")


def layer_tensor_names(i: int) -> dict[str, str]:
    """Short name -> file name of OPT layer i's tensors."""
    return families.opt_layer_names(i)


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Every file a complete weight folder of `config`'s family holds, with its shape."""
    return families.expected_tensors(config)


def hf_key_to_file_name(key: str, keep_lm_head: bool = False) -> str | None:
    """A Hugging Face state-dict key -> the weight folder's file name (None: not stored). OPT's
    `lm_head` is tied and never stored; with `keep_lm_head` (Llama family) it is `lm_head.weight`,
    kept where the model's expected tensors name it (untied)."""
    if key.startswith("model."):
        key = key[len("model."):]
    if key == "lm_head.weight":
        return key if keep_lm_head else None
    return key.replace("decoder.final_layer_norm.", "decoder.layer_norm.")
