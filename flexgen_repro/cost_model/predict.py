"""Predictions of the cost model for one policy: throughput, prefill and decode time, the term that
binds each phase, and peak memory per tier against the profile's limits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexgen_repro.config import OptConfig
from flexgen_repro.cost_model.equations import (PAGE_CACHE, StepModel, build_step_model,
                                               streams_weights, tier_of)
from flexgen_repro.cost_model.hardware import GIB, HardwareProfile
from flexgen_repro.policy import Policy

# A placement may use its tier up to the limit; this slack absorbs floating-point round-off only.
FIT_RTOL = 1e-9


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for one policy (times in seconds, memory in bytes)."""
    throughput: float            # generated tokens / (prefill + decode time)
    decode_throughput: float     # tokens after the first / decode time
    prefill_time: float          # all layers, whole block; produces the first token
    decode_step_time: float      # one generated token, all layers, whole block (average)
    decode_time: float           # (gen_len - 1) decode steps
    block_size: int
    prefill_terms: dict          # seconds per layer (whole block) by term
    decode_terms: dict
    prefill_bound: str           # the term that binds (largest)
    decode_bound: str
    peak_memory: dict            # tier -> peak bytes over prefill and decode
    capacity: dict               # tier -> usable bytes
    over: tuple                  # tiers whose peak exceeds their capacity
    page_cache: bool = False     # the disk tier predicted at the page cache's rates

    @property
    def feasible(self) -> bool:
        return not self.over

    def memory_gib(self) -> dict:
        return {t: round(v / GIB, 3) for t, v in self.peak_memory.items()}

    def as_dict(self) -> dict:
        return {
            "predicted_throughput": self.throughput,
            "predicted_decode_throughput": self.decode_throughput,
            "predicted_prefill_s": self.prefill_time,
            "predicted_decode_step_s": self.decode_step_time,
            "predicted_decode_s": self.decode_time,
            "prefill_bound": self.prefill_bound, "decode_bound": self.decode_bound,
            "prefill_terms_s_per_layer": dict(self.prefill_terms),
            "decode_terms_s_per_layer": dict(self.decode_terms),
            "peak_memory_gib": self.memory_gib(),
            "capacity_gib": {t: round(v / GIB, 3) for t, v in self.capacity.items()},
            "fits": self.feasible, "over": list(self.over), "disk_in_page_cache": self.page_cache,
        }


def tier_peaks(model: StepModel, x) -> tuple[dict, dict]:
    """(peak bytes, capacity) per constraint tier ("gpu", "cpu", "disk", "gpu+cpu"); the
    page-cache constraints are not a tier (StepModel.page_cache_fits)."""
    peak, cap = {}, {}
    for name, term in model.memory.items():
        tier = tier_of(name)
        if tier == PAGE_CACHE:
            continue
        peak[tier] = max(peak.get(tier, 0.0), term(x))
        cap[tier] = model.capacity[name]
    if model.graph_streamed and streams_weights(x) and "gpu" in peak:
        peak["gpu"] += model.slot_bytes   # held beside the loads in flight of prefill
    return peak, cap


def evaluate_at(model: StepModel, x) -> Prediction:
    """The prediction of a built step model at placement vector `x`."""
    x = np.asarray(x, dtype=float)
    pre_terms = {name: term(x) for name, term in model.terms("prefill", x).items()}
    dec_terms = {name: term(x) for name, term in model.terms("decode", x).items()}
    prefill, decode = model.total_time(x)
    n = model.gen_len
    peak, cap = tier_peaks(model, x)
    over = tuple(t for t in peak if peak[t] > cap[t] * (1 + FIT_RTOL))
    return Prediction(
        throughput=model.block_size * n / (prefill + decode),
        decode_throughput=model.block_size * (n - 1) / decode if n > 1 else 0.0,
        prefill_time=prefill,
        decode_step_time=decode / (n - 1) if n > 1 else 0.0,
        decode_time=decode, block_size=model.block_size,
        prefill_terms=pre_terms, decode_terms=dec_terms,
        prefill_bound=max(pre_terms, key=pre_terms.get),
        decode_bound=max(dec_terms, key=dec_terms.get),
        peak_memory=peak, capacity=cap, over=over, page_cache=model.page_cache)


def evaluate_policy(config: OptConfig, policy: Policy, profile: HardwareProfile, prompt_len: int,
                    gen_len: int) -> Prediction:
    """Predicted throughput, times, binding terms and peak memory per tier of `policy`, at the
    placement the runtime realizes for its percentages (whole weight tensors, whole batch rows);
    a disk tier within the page cache's share of host memory at the page cache's rates, where
    the profile has them."""
    return evaluate_at(*policy_model(config, policy, profile, prompt_len, gen_len))


def policy_model(config: OptConfig, policy: Policy, profile: HardwareProfile, prompt_len: int,
                 gen_len: int) -> tuple[StepModel, np.ndarray]:
    """The step model that describes how the runtime runs `policy` (with its disk tier in the
    page cache where it fits there) and the placement it realizes."""
    model = build_step_model(config, policy, prompt_len, gen_len, profile)
    x = model.placement(policy.percent)
    if profile.has_page_cache_rates and x[[2, 5, 8]].sum() > 0:
        cached = build_step_model(config, policy, prompt_len, gen_len, profile, page_cache=True)
        if cached.page_cache_fits(x):
            return cached, x
    return model, x
