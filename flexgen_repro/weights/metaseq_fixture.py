"""Scaled-down OPT checkpoints in metaseq's exact 992-file release layout, for tests and benchmarks.

`write_checkpoint(dir, ScaledOpt(...))` builds a random OPT (fp16), cuts it the way Megatron and FSDP
did for OPT-175B and writes `checkpoint_last-model_part-<K>-shard<N>.pt` files with the released
dictionary structure: `model` (FSDP flat parameters and buffers), `shard_metadata` (`param_metadata`
with `fsdp_path`, `params` {flat name: names, shapes, numels, padding}, `no_broadcast_optim_state`,
`shared_param_info`; `buffer_names`), `cfg`, `extra_state`, `optimizer_history`, `args` (and,
optionally, a `last_optimizer_state`). It returns the glued tensors under the weight folder's names:
what a correct conversion must produce.
"""
from __future__ import annotations

import collections
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

LAYER_PARAMS = ("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias", "self_attn.out_proj.weight",
                "self_attn.out_proj.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
                "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                "final_layer_norm.weight", "final_layer_norm.bias")
ROOT_PARAMS = ("decoder.embed_tokens.weight", "decoder.embed_positions.weight",
               "decoder.layer_norm.weight", "decoder.layer_norm.bias")


@dataclass(frozen=True)
class ScaledOpt:
    """Sizes of a scaled-down OPT and of its metaseq sharding (OPT-175B: 96, 12288, 96, 49152, 50272)."""
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    ffn: int = 256
    vocab: int = 8 * 16
    positions: int = 30          # max_seq_len; the learned table has positions + 2 rows
    parts: int = 8               # Megatron tensor-parallel parts
    shards: int = 124            # FSDP ranks per part
    seed: int = 0
    optimizer_state: bool = False  # add a last_optimizer_state (fp32 Adam moments) that conversion drops


class FixtureConfig:
    """Stands in for the OmegaConf config in real shards: a class the converter must not need."""

    def __init__(self, model: dict):
        self.model = model


def glued_state(spec: ScaledOpt) -> dict[str, np.ndarray]:
    """A random fp16 OPT under the weight folder's tensor names."""
    rng = np.random.default_rng(spec.seed)
    h, f = spec.hidden, spec.ffn

    def rand(*shape, scale=0.05, mean=0.0):
        return (mean + scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)

    state = {"decoder.embed_tokens.weight": rand(spec.vocab, h, scale=0.5),
             "decoder.embed_positions.weight": rand(spec.positions + 2, h, scale=0.5),
             "decoder.layer_norm.weight": rand(h, scale=0.1, mean=1.0),
             "decoder.layer_norm.bias": rand(h, scale=0.1)}
    for i in range(spec.layers):
        p = f"decoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            state[f"{p}self_attn.{proj}_proj.weight"] = rand(h, h, scale=h ** -0.5)
            state[f"{p}self_attn.{proj}_proj.bias"] = rand(h, scale=0.02)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            state[f"{p}{ln}.weight"] = rand(h, scale=0.1, mean=1.0)
            state[f"{p}{ln}.bias"] = rand(h, scale=0.1)
        state[f"{p}fc1.weight"], state[f"{p}fc1.bias"] = rand(f, h, scale=h ** -0.5), rand(f, scale=0.02)
        state[f"{p}fc2.weight"], state[f"{p}fc2.bias"] = rand(h, f, scale=f ** -0.5), rand(h, scale=0.02)
    return state


def _block(x: np.ndarray, part: int, parts: int, axis: int) -> np.ndarray:
    n = x.shape[axis] // parts
    return np.take(x, np.arange(part * n, (part + 1) * n), axis=axis)


def split_part(state: dict[str, np.ndarray], part: int, parts: int, layers: int) -> dict[str, np.ndarray]:
    """Model part `part` of `parts` as Megatron holds it: metaseq names, qkv fused in k, v, q order."""
    out = {"decoder.embed_tokens.weight": _block(state["decoder.embed_tokens.weight"], part, parts, 0),
           "decoder.embed_positions.weight": state["decoder.embed_positions.weight"],
           "decoder.layer_norm.weight": state["decoder.layer_norm.weight"],
           "decoder.layer_norm.bias": state["decoder.layer_norm.bias"]}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{p}self_attn.qkv_proj.{kind}"] = np.concatenate(
                [_block(state[f"{p}self_attn.{x}_proj.{kind}"], part, parts, 0) for x in "kvq"])
            out[f"{p}fc1.{kind}"] = _block(state[f"{p}fc1.{kind}"], part, parts, 0)
        for name in ("self_attn.out_proj", "fc2"):
            out[f"{p}{name}.weight"] = _block(state[f"{p}{name}.weight"], part, parts, 1)
            out[f"{p}{name}.bias"] = state[f"{p}{name}.bias"]
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            for kind in ("weight", "bias"):
                out[f"{p}{ln}.{kind}"] = state[f"{p}{ln}.{kind}"]
    return out


def _fsdp_modules(layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """(fsdp_path, parameter names relative to it): the root module, then one per layer."""
    return [("", ROOT_PARAMS)] + [(f"decoder.layers.{i}", LAYER_PARAMS) for i in range(layers)]


def _fsdp_chunks(flat: np.ndarray, ranks: int) -> list[tuple[np.ndarray, int]]:
    """fairscale's sharding: torch.chunk sizes, every shard zero-padded to the first one's length."""
    size = math.ceil(flat.size / ranks) if flat.size else 0
    out = []
    for r in range(ranks):
        piece = flat[r * size:(r + 1) * size]
        padded = np.zeros(size, flat.dtype)
        padded[:piece.size] = piece
        out.append((padded, size - piece.size))
    return out


def _part_shards(part_state: dict[str, np.ndarray], spec: ScaledOpt) -> list[tuple[dict, dict]]:
    """(model dict, shard_metadata) of every FSDP rank of one model part."""
    import torch
    shards = [(collections.OrderedDict(), {"param_metadata": [], "buffer_names": ["decoder.version"]})
              for _ in range(spec.shards)]
    for path, names in _fsdp_modules(spec.layers):
        full = [part_state[f"{path}.{n}" if path else n] for n in names]
        flat = np.concatenate([t.reshape(-1) for t in full])
        shared = [("decoder.embed_tokens.weight", "decoder.output_projection.weight")] if not path else []
        for (piece, pad), (model, meta) in zip(_fsdp_chunks(flat, spec.shards), shards):
            model[f"{path}.flat_param_0" if path else "flat_param_0"] = torch.from_numpy(piece.copy())
            meta["param_metadata"].append({
                "fsdp_path": path,
                "params": {"flat_param_0": {"names": list(names),
                                            "shapes": [torch.Size(t.shape) for t in full],
                                            "numels": [int(t.size) for t in full], "padding": pad}},
                "no_broadcast_optim_state": False, "shared_param_info": shared})
    for model, _ in shards:
        model["decoder.version"] = torch.tensor([3.0])
    return shards


def _file_dict(model: dict, meta: dict, spec: ScaledOpt) -> dict:
    import torch
    ckpt = {"model": model, "shard_metadata": meta,
            "cfg": FixtureConfig({"_name": "transformer_lm_megatron", "decoder_layers": spec.layers,
                                  "decoder_embed_dim": spec.hidden, "decoder_attention_heads": spec.heads,
                                  "decoder_ffn_embed_dim": spec.ffn,
                                  "max_target_positions": spec.positions, "model_parallel_size": spec.parts}),
            "extra_state": {"epoch": 1, "train_iterator": {"epoch": 1, "iterations_in_epoch": 0},
                            "previous_training_time": 0.0},
            "optimizer_history": [{"criterion_name": "VocabParallelCrossEntropyCriterion",
                                   "optimizer_name": "MemoryEfficientFP16Optimizer",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 143000}],
            "args": None}
    if spec.optimizer_state:
        ckpt["last_optimizer_state"] = {
            "state": {i: {"step": 143000, "exp_avg": t.float(), "exp_avg_sq": t.float() ** 2}
                      for i, t in enumerate(v for k, v in model.items() if "flat_param" in k)},
            "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.95), "params": list(range(spec.layers + 1))}]}
    return ckpt


def shard_file_name(part: int, shard: int) -> str:
    return f"checkpoint_last-model_part-{part}-shard{shard}.pt"


def spec_of(state: dict[str, np.ndarray], heads: int, **kwargs) -> ScaledOpt:
    """The ScaledOpt describing given glued tensors (e.g. a transformers model's, in folder names)."""
    vocab, hidden = state["decoder.embed_tokens.weight"].shape
    layers = sum(1 for n in state if n.endswith(".fc1.weight"))
    return ScaledOpt(layers=layers, hidden=hidden, heads=heads, ffn=state["decoder.layers.0.fc1.weight"].shape[0],
                     vocab=vocab, positions=state["decoder.embed_positions.weight"].shape[0] - 2, **kwargs)


def write_checkpoint(out_dir: str, spec: ScaledOpt,
                     state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write the parts x shards files of a scaled OPT (random, or the given fp16 glued `state`);
    return its glued tensors under the weight folder's names."""
    import torch
    if spec.vocab % spec.parts or spec.hidden % spec.parts or spec.ffn % spec.parts:
        raise ValueError(f"vocab, hidden and ffn must be multiples of parts: {asdict(spec)}")
    os.makedirs(out_dir, exist_ok=True)
    state = glued_state(spec) if state is None else {k: np.asarray(v, np.float16) for k, v in state.items()}
    for part in range(spec.parts):
        shards = _part_shards(split_part(state, part, spec.parts, spec.layers), spec)
        for rank, (model, meta) in enumerate(shards):
            torch.save(_file_dict(model, meta, spec), os.path.join(out_dir, shard_file_name(part, rank)))
    return state


def checkpoint_bytes(out_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
