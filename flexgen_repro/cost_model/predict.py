"""Predictions of the cost model for one policy: throughput, prefill and decode time, the term that
binds each phase, and peak memory per tier against the profile's limits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexgen_repro.config import OptConfig
from flexgen_repro.cost_model.equations import StepModel, build_step_model, tier_of
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
            "fits": self.feasible, "over": list(self.over),
        }


def tier_peaks(model: StepModel, x) -> tuple[dict, dict]:
    """(peak bytes, capacity) per constraint tier ("gpu", "cpu", "disk", "gpu+cpu")."""
    peak, cap = {}, {}
    for name, term in model.memory.items():
        tier = tier_of(name)
        peak[tier] = max(peak.get(tier, 0.0), term(x))
        cap[tier] = model.capacity[name]
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
        peak_memory=peak, capacity=cap, over=over)


def evaluate_policy(config: OptConfig, policy: Policy, profile: HardwareProfile, prompt_len: int,
                    gen_len: int) -> Prediction:
    """Predicted throughput, times, binding terms and peak memory per tier of `policy`, at the
    placement the runtime realizes for its percentages (whole weight tensors, whole batch rows)."""
    model = build_step_model(config, policy, prompt_len, gen_len, profile)
    return evaluate_at(model, model.placement(policy.percent))
