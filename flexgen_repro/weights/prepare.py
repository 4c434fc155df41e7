"""`invoke prepare-weights`: from a model name or checkpoint folder to `<path>/<name>-np/`.

Picks the source (a download from the Hugging Face hub, a local Hugging Face folder, or metaseq's
files for OPT-175B), checks it matches the model, converts it (streaming, resumable) and verifies the
result. Every problem a user can fix comes back as one clear message and exit code 2.
"""
from __future__ import annotations

import os
import sys

from flexgen_repro.config import OPT_PRESETS, OptConfig, get_opt_config
from flexgen_repro.weights import hf, metaseq
from flexgen_repro.weights.folder import WeightsError
from flexgen_repro.weights.layout import weight_dir

RELEASE_175B = (8, 124)  # Megatron parts x FSDP ranks of Meta's OPT-175B release
NOT_ON_HUB = {"opt-tiny": "it is a CPU-sized shape for dummy weights only (use --path _DUMMY_ at run time)",
              "opt-175b": "Meta distributes it on request as 992 metaseq shard files (README: OPT-175B "
                          "weights); pass --source DIR_WITH_THE_992_FILES"}
_SHAPE_FIELDS = ("num_hidden_layers", "n_head", "hidden_size", "ffn_embed_dim", "vocab_size", "max_seq_len")


def source_kind(src: str) -> str:
    """"hf" (config.json + weights) or "metaseq" (shard, reshard or consolidated .pt files)."""
    if os.path.isfile(src) and src.endswith(".pt"):
        return "metaseq"
    if not os.path.isdir(src):
        raise WeightsError(f"source {src} does not exist; pass --source DIR with the checkpoint folder")
    if hf.is_hf_folder(src):
        return "hf"
    if any(metaseq.SHARD_RE.match(e) or metaseq.RESHARD_RE.match(e) for e in os.listdir(src)):
        return "metaseq"
    raise WeightsError(f"{src} holds neither a Hugging Face checkpoint (config.json plus weights) nor "
                       "metaseq files (checkpoint_last-model_part-<K>-shard<N>.pt)")


def _check_same_shape(config: OptConfig, other: OptConfig, src: str) -> None:
    diffs = [f"{f} {getattr(other, f)} (expected {getattr(config, f)})" for f in _SHAPE_FIELDS
             if getattr(other, f) != getattr(config, f)]
    if diffs:
        raise WeightsError(f"{src} is not {config.name}: " + ", ".join(diffs))


def convert_source(src: str, out_dir: str, config: OptConfig | None = None) -> str:
    """Convert any supported checkpoint into the folder `out_dir`; sizes come from the source, and
    `config`, when given, must match them. Returns out_dir."""
    src = os.path.expanduser(src)
    if source_kind(src) == "hf":
        src_config = get_opt_config(src)
        if config is not None:
            _check_same_shape(config, src_config, src)
        return hf.convert_hf_folder(src, out_dir, config or src_config)
    release = os.path.isdir(src) and any(metaseq.SHARD_RE.match(e) for e in os.listdir(src))
    is_175b = release and config is not None and config.name == "opt-175b"
    parts, shards = RELEASE_175B if is_175b else (None, None)
    return metaseq.convert_metaseq_shards(src, out_dir, config=config, parts=parts, shards=shards)


def model_config(model: str) -> OptConfig:
    """The config of a model name or of a local checkpoint folder (`~` expanded)."""
    local = os.path.expanduser(model)
    return get_opt_config(local if os.path.isdir(local) else model)


def prepare(model: str, path: str, source: str | None = None) -> str:
    """Write `<path>/<name>-np/` for a model name or a local checkpoint folder; return the folder."""
    model_is_dir = os.path.isdir(os.path.expanduser(model))
    if model_is_dir and source:
        raise WeightsError("pass either --model DIR (a checkpoint folder) or --model NAME --source DIR, not both")
    if model_is_dir:
        model = os.path.expanduser(model)
        if not hf.is_hf_folder(model):
            raise WeightsError(f"{model} has no config.json; --model DIR must be a Hugging Face checkpoint folder")
        config = get_opt_config(model)
        return convert_source(model, weight_dir(path, config.name), config)
    config = get_opt_config(model)  # unknown names raise, listing the valid ones
    if source is None:
        if config.name in NOT_ON_HUB:
            raise WeightsError(f"{config.name} is not on the Hugging Face hub: {NOT_ON_HUB[config.name]}")
        source = hf.download(config)
    return convert_source(source, weight_dir(path, config.name), config)


def main(model: str, path: str = "~/opt_weights", source: str | None = None) -> int:
    """Entry point of `invoke prepare-weights`; 0 on success, 2 on a problem the message explains."""
    from flexgen_repro.weights import verify
    try:
        folder = prepare(model, path, source)
        config = model_config(model)
        verify.check_folder(config, folder)
    except ValueError as e:  # WeightsError, and get_opt_config's unknown-model error
        print(f"prepare-weights: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare-weights: interrupted; finished tensors are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    known = config.name in OPT_PRESETS
    print(f"weights ready in {folder}; check them any time with "
          f"`invoke verify-weights --model {config.name if known else model} --path {path}`")
    return 0
