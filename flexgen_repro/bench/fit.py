"""Will a case fit this machine? The memory each tier must hold for a case, and what the machine has.

The estimate is a floor, not a forecast: the bytes the policy places on each tier (weights, KV cache,
activations, split by the six percentages, at 4 bits per value plus a min and a scale per group when
compressed) plus one layer of streamed weights and cache staged on the GPU. A case is skipped only
when even that floor does not fit, so a case the runtime could run is never skipped.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field

from flexgen_repro.config import OptConfig
from flexgen_repro.policy import CompressionConfig, Policy

GiB = 1 << 30
TIER_NAMES = ("gpu", "cpu", "disk")


def stored_bytes(raw_bytes: float, dtype_bytes: int, comp: CompressionConfig | None) -> float:
    """Bytes of `raw_bytes` of dtype values once group-quantized by `comp` (None: uncompressed).

    Each group of `group_size` values keeps num_bits per value plus a min and a scale in the dtype.
    """
    if comp is None:
        return raw_bytes
    values = raw_bytes / dtype_bytes
    return values * comp.num_bits / 8 + math.ceil(values / comp.group_size) * 2 * dtype_bytes


@dataclass(frozen=True)
class Needs:
    """Bytes a case must hold per tier ("gpu", "cpu", "disk"), with the parts that make them up."""
    parts: dict[str, dict[str, float]] = field(default_factory=dict)

    def total(self, tier: str) -> float:
        return sum(self.parts.get(tier, {}).values())

    def describe(self, tier: str) -> str:
        items = [f"{k} {v / GiB:.2f}" for k, v in self.parts.get(tier, {}).items() if v]
        return ", ".join(items) or "nothing"


@dataclass(frozen=True)
class Available:
    """Bytes the machine offers per tier; `gpu` is None without a GPU (its tier is host memory)."""
    gpu: float | None
    cpu: float
    disk: float
    gpu_what: str = ""
    disk_what: str = ""


def _split(total: float, percents: tuple[float, float, float]) -> dict[str, float]:
    return {tier: total * p / 100 for tier, p in zip(TIER_NAMES, percents)}


def flexgen_needs(config: OptConfig, policy: Policy, prompt_len: int, gen_len: int) -> Needs:
    """The floor of what a FlexGen policy places on each tier."""
    db = config.dtype_bytes
    wcomp = policy.comp_weight_config if policy.compress_weight else None
    ccomp = policy.comp_cache_config if policy.compress_cache else None
    seq = prompt_len + gen_len
    weights = _split(stored_bytes(config.model_bytes(), db, wcomp), policy.weight_percents())
    parts = _parts(config, policy, prompt_len, gen_len, weights, TIER_NAMES)
    layer_w = stored_bytes(config.layer_params() * db, db, wcomp)
    staging = 0.0
    if policy.w_gpu_percent < 100:
        staging += layer_w + (config.layer_params() * db if wcomp else 0)
    if policy.cache_gpu_percent < 100 and not policy.cpu_cache_compute:
        layers = config.num_hidden_layers
        staging += stored_bytes(config.cache_bytes(policy.gpu_batch_size, seq), db, ccomp) / layers
    parts["gpu"]["staging"] = staging
    return Needs(parts)


def original_weight_split(config: OptConfig, policy: Policy) -> dict[str, float]:
    """Bytes of weights per tier as the original FlexGen places them: layer by layer (the input
    embedding, each attention and MLP, the output embedding), each tensor goes to the tier whose
    percent range holds the midpoint of the tensor within the layer's running total. For OPT-30B
    `20 80` that keeps one attention matrix in four on the GPU and no MLP matrix: about 8% of the
    weights."""
    from flexgen_repro.cost_model.placement import layer_tensors
    gpu, cpu = policy.w_gpu_percent / 100, (policy.w_gpu_percent + policy.w_cpu_percent) / 100
    raw = layer_tensors(config, dataclasses.replace(policy, compress_weight=False))
    stored = layer_tensors(config, policy)
    split = dict.fromkeys(TIER_NAMES, 0.0)
    for (_, sizes), (_, kept) in zip(raw, stored):
        total, seen = sum(sizes), 0.0
        for size, nbytes in zip(sizes, kept):
            mid = (seen + size / 2) / total
            seen += size
            split["gpu" if mid < gpu else "cpu" if mid < cpu else "disk"] += nbytes
    return split


def original_needs(config: OptConfig, policy: Policy, prompt_len: int, gen_len: int) -> Needs:
    """The floor of what the original FlexGen holds in host memory and on disk for a policy: its
    weights as its placement rule puts them, the KV cache and activations by the percentages. The
    GPU is left out: its own checks decide what fits there."""
    weights = original_weight_split(config, policy)
    return Needs(_parts(config, policy, prompt_len, gen_len, weights, ("cpu", "disk")))


def _parts(config: OptConfig, policy: Policy, prompt_len: int, gen_len: int,
           weights: dict[str, float], tiers) -> dict[str, dict[str, float]]:
    """Per tier of `tiers`: the given weight bytes, and the KV cache (at its stored size) and the
    activations of the block split by the policy's percentages."""
    ccomp = policy.comp_cache_config if policy.compress_cache else None
    block = policy.block_size
    cache = _split(stored_bytes(config.cache_bytes(block, prompt_len + gen_len), config.dtype_bytes,
                                ccomp), policy.cache_percents())
    act = _split(config.hidden_bytes(block, prompt_len), policy.act_percents())
    return {tier: {"weights": weights[tier], "cache": cache[tier], "activations": act[tier]}
            for tier in tiers}


def accelerate_needs(config: OptConfig, batch: int, prompt_len: int, gen_len: int) -> Needs:
    """The HF Accelerate and ZeRO-Inference baselines: the whole model is built in host memory (fp16
    for both: ZeRO's 4-bit weights are quantized from fp16 as each module is built); cache and
    activations on the GPU."""
    seq = prompt_len + gen_len
    return Needs({"gpu": {"cache": config.cache_bytes(batch, seq),
                          "activations": config.hidden_bytes(batch, prompt_len)},
                  "cpu": {"weights": config.model_bytes()}})


def model_only_needs(config: OptConfig) -> Needs:
    """For `--percent auto`: only the weights are known; they must fit somewhere."""
    return Needs({"any": {"weights": config.model_bytes()}})


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def machine_available(hardware: dict, gpu_mem_gb: float | None, offload_dir: str) -> Available:
    """What the machine offers: GPU memory (capped), available host memory, free disk at offload_dir."""
    import psutil
    gpu, gpu_what = None, "no GPU: the gpu tier is host memory"
    if hardware.get("gpu_mem_gb"):
        gpu = hardware["gpu_mem_gb"] * GiB
        gpu_what = f"{hardware.get('gpu_name', 'GPU')} has {hardware['gpu_mem_gb']:.1f} GiB"
        if gpu_mem_gb and gpu_mem_gb * GiB < gpu:
            gpu = gpu_mem_gb * GiB
            gpu_what = f"--gpu-mem-gb cap {gpu_mem_gb:g} GiB on {hardware.get('gpu_name', 'the GPU')}"
    where = _nearest_existing(offload_dir)
    return Available(gpu=gpu, cpu=psutil.virtual_memory().available,
                     disk=shutil.disk_usage(where).free, gpu_what=gpu_what,
                     disk_what=f"free at {where}")


def skip_reason(needs: Needs, avail: Available) -> str | None:
    """Why the case cannot fit (with the numbers), or None when it may fit."""
    if "any" in needs.parts:
        need = needs.total("any")
        have = (avail.gpu or 0) + avail.cpu + avail.disk
        if need > have:
            return (f"needs at least {need / GiB:.1f} GiB for the weights; GPU, host memory and disk "
                    f"together have {have / GiB:.1f} GiB")
        return None
    gpu, cpu, disk = needs.total("gpu"), needs.total("cpu"), needs.total("disk")
    cpu_parts = needs.describe("cpu")
    if avail.gpu is None:  # the gpu tier lives in host memory
        cpu, cpu_parts = cpu + gpu, f"{cpu_parts}; gpu tier {gpu / GiB:.2f}"
    elif gpu > avail.gpu:
        return (f"needs at least {gpu / GiB:.1f} GiB of GPU memory ({needs.describe('gpu')}); "
                f"there is {avail.gpu / GiB:.1f} GiB ({avail.gpu_what})")
    if cpu > avail.cpu:
        return (f"needs at least {cpu / GiB:.1f} GiB of host memory ({cpu_parts}); "
                f"{avail.cpu / GiB:.1f} GiB is available")
    if disk > avail.disk:
        return (f"needs at least {disk / GiB:.1f} GiB of disk ({needs.describe('disk')}); "
                f"there is {avail.disk / GiB:.1f} GiB ({avail.disk_what})")
    return None


def case_needs(case) -> Needs:
    """The floor of a suite case (a `suites.Case`) per tier, whatever runs it."""
    config = case.config()
    if case.runner in ("accelerate", "deepspeed"):
        return accelerate_needs(config, case.gpu_batch_size, case.prompt_len, case.gen_len)
    if case.runner == "original":
        return original_needs(config, case.policy(), case.prompt_len, case.gen_len)
    if case.auto:
        return model_only_needs(config)
    return flexgen_needs(config, case.policy(), case.prompt_len, case.gen_len)
