"""What the text job needs before it runs: the model's config, its checkpoint and tokenizer, its
weight folder (prepared on first use), and a policy (given, or the cost model's choice).

Every problem a user can fix is a `TextJobError` whose message names the fix.
"""
from __future__ import annotations

import logging
import math
import os

from flexgen_repro.policy import Policy

DEFAULT_MODEL = "smollm2-135m-instruct"
DUMMY = "_DUMMY_"
log = logging.getLogger("flexgen_repro.text")


class TextJobError(ValueError):
    """Bad input to the text job: the message says what to change."""


def default_dtype() -> str:
    """The compute dtype where none is given: float16 on a GPU (the original's), float32 without
    one (a CPU multiplies 16-bit matrices through conversions, slower than float32, and rounds
    what transformers' default float32 would not)."""
    import torch
    return "float16" if torch.cuda.is_available() else "float32"


def model_config(model: str, **overrides):
    """The config of a known name or a local checkpoint folder (any family the runtime knows)."""
    from flexgen_repro import config as cfg
    local = os.path.expanduser(model)
    target = local if os.path.isdir(local) else model
    get = getattr(cfg, "get_model_config", None) or cfg.get_opt_config
    try:
        return get(target, **overrides)
    except (ValueError, KeyError, OSError) as e:
        raise TextJobError(str(e).strip("'\"")) from None


def checkpoint_dir(model: str, config) -> str | None:
    """A local Hugging Face checkpoint folder of `model`, or None where none is at hand offline."""
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        return local
    try:
        from flexgen_repro.weights import smollm2
        if config.name == getattr(smollm2, "NAME", DEFAULT_MODEL):
            return smollm2.checkpoint_dir()
    except (ImportError, AttributeError, OSError):
        pass
    try:
        import huggingface_hub
        from flexgen_repro.weights.hf import hub_repo_id
        return huggingface_hub.snapshot_download(hub_repo_id(config.name), local_files_only=True)
    except Exception:  # noqa: BLE001 (any miss of the local cache means: not at hand)
        return None


def load_tokenizer(model: str, config, tokenizer: str | None, dummy: bool):
    """transformers' tokenizer from `tokenizer` (a folder) or the model's checkpoint, offline."""
    source = tokenizer or (None if dummy else checkpoint_dir(model, config))
    if source is None:
        if dummy:
            raise TextJobError("dummy weights have no tokenizer, so no text path: pass a tokenizer "
                               "folder (tokenizer=DIR / --tokenizer DIR)")
        raise TextJobError(f"no tokenizer for {config.name} on this machine: pass --model with its "
                           "checkpoint folder, or a tokenizer folder (tokenizer=DIR / --tokenizer DIR)")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(source), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise TextJobError(f"cannot load a tokenizer from {source}: {str(e).splitlines()[0]}; "
                           "pass a folder holding tokenizer.json or the tokenizer's files") from None


def weight_folder(model: str, config, path: str) -> str:
    """`<path>/<name>-np/`, converted from the local checkpoint first where it is missing."""
    from flexgen_repro.weights.layout import weight_dir
    folder = weight_dir(path, config.name)
    if os.path.isdir(folder) and os.listdir(folder):
        return folder
    source = checkpoint_dir(model, config)
    if source is None:
        raise TextJobError(f"no weight folder {folder} and no local checkpoint of {config.name} to "
                           f"make it from: run `invoke prepare-weights --model {model} --path {path}`")
    from flexgen_repro.weights import prepare
    log.info("preparing %s from %s (once)", folder, source)
    if os.path.isdir(os.path.expanduser(model)):
        prepare.prepare(os.path.expanduser(model), path)
    else:
        prepare.prepare(model, path, source=source)
    return folder


def default_hardware() -> str:
    """The measured `local` profile where there is one, else the shipped profile of the nearest
    machine (h100 for a GPU of 40 GiB or more, otherwise t4-paper)."""
    from flexgen_repro.cost_model.hardware import LOCAL_PROFILE
    if os.path.exists(os.path.expanduser(LOCAL_PROFILE)):
        return "local"
    import torch
    if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 40 * 2**30:
        return "h100"
    return "t4-paper"


def auto_policy(config, prompt_len: int, gen_len: int, prompts: int,
                hardware: str | None = None, compress: bool = False) -> Policy:
    """The cost model's best policy for these lengths among blocks no larger than `prompts` rows
    need (block_cap), its block then shrunk to them (fit_block)."""
    import torch
    from flexgen_repro.cost_model.hardware import load_profile
    from flexgen_repro.cost_model.search import DoesNotFit, SearchSpace, best_policy
    hardware = hardware or default_hardware()
    try:
        profile = load_profile(hardware)
        # a shipped profile's memory is another machine's: no tier larger than this machine's
        from flexgen_repro.cost_model.profile import host_only_tiers, host_usable
        if torch.cuda.is_available():
            gpu = min(profile.gpu_mem_bytes, torch.cuda.mem_get_info()[1])
            cpu = min(profile.cpu_mem_bytes, host_usable())
        else:  # both tiers are host memory, whatever the profile's GPU
            gpu, cpu = host_only_tiers()
        gpu_gb, cpu_gb = gpu / 2**30, cpu / 2**30
        space = SearchSpace(max_block_size=block_cap(prompts, SearchSpace()))
        found = best_policy(config, profile, prompt_len, gen_len, compress=compress, gpu_mem_gb=gpu_gb,
                            cpu_mem_gb=cpu_gb, space=space)
    except (DoesNotFit, FileNotFoundError) as e:
        raise TextJobError(f"no policy for {config.name} on profile {hardware}: {e}; pass "
                           "--percent with six numbers") from None
    policy = fit_block(found.policy, prompts)
    log.info("policy (cost model, %s profile, prompt %d, gen %d): %s", hardware, prompt_len,
             gen_len, describe(policy))
    return policy


def block_cap(prompts: int, space) -> int:
    """The largest block worth searching for `prompts` rows: the smallest GPU batch size the
    space offers that holds them all (so one GPU batch is among the shapes), else its smallest
    block that does, else its largest block. A larger block would be padding."""
    blocks = [b * k for b in space.gpu_batch_sizes for k in space.num_gpu_batches]
    for sizes in (space.gpu_batch_sizes, blocks):
        holding = [n for n in sizes if prompts <= n <= space.max_block_size]
        if holding:
            return min(holding)
    return space.max_block_size


def fit_block(policy: Policy, prompts: int) -> Policy:
    """`policy` with a block no larger than needed for `prompts` rows (less padding, less memory):
    as few GPU batches as its GPU batch size allows, the rows shared evenly among them (no GPU
    batch larger than the policy's)."""
    if prompts >= policy.block_size:
        return policy
    import dataclasses
    batches = math.ceil(prompts / policy.gpu_batch_size)   # fewer than the policy's: prompts < block
    return dataclasses.replace(policy, num_gpu_batches=batches,
                               gpu_batch_size=math.ceil(prompts / batches))


def describe(policy: Policy) -> str:
    """The policy as flex_opt flags."""
    from flexgen_repro.cost_model.cli import policy_flags
    return policy_flags(policy)
