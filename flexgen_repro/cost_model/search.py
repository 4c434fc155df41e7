"""Policy search: a linear program over the placement inside a search over the block shape.

For each switch setting (CPU attention on/off; with `compress`, 4-bit weights and/or cache) and each
(gpu_batch_size, num_gpu_batches) of a modest grid, the placement fractions are continuous and the
per-layer times are max() of affine terms, so minimizing the generation time

    layers * T_pre + (n - 1) * layers * T_gen,   T_pre >= every prefill term, T_gen >= every decode term

under the peak-memory limits of each tier is a small LP (11 variables), solved with scipy's HiGHS.
Shapes are pruned by a lower bound on their time and by memory (more GPU batches or a larger GPU
batch never needs less memory, so the first infeasible one ends its row). Where everything fits
on the GPU, that placement is a candidate too, timed with CUDA-graph decode (which the LP's terms
do not see). The best relaxed solutions are rounded (weights to integer percentages, cache and
hidden states to whole rows of a GPU batch, as the runtime splits them), repaired (towards the
lower tier) if rounding broke a limit, and re-evaluated at the placement the runtime realizes;
the best rounded policy wins.
"""
from __future__ import annotations

import bisect
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from flexgen_repro.config import OptConfig
from flexgen_repro.cost_model.equations import (ALL_ON_GPU, HOST_CACHE_STEPS, STREAMED, StepModel,
                                                build_step_model, model_sizes, tier_of)
from flexgen_repro.cost_model.hardware import GIB, HardwareProfile
from flexgen_repro.cost_model.placement import row_percent, rows_of
from flexgen_repro.cost_model.predict import Prediction, evaluate_at, evaluate_policy, tier_peaks
from flexgen_repro.policy import Policy

__all__ = ["SearchSpace", "SearchResult", "DoesNotFit", "best_policy", "evaluate_policy"]

NVARS = 11          # the 9 placement fractions, T_pre, T_gen
MAX_REPAIR_STEPS = 400
TIE_BREAK = 1e-6


@dataclass(frozen=True)
class SearchSpace:
    """The block shapes and options searched (the paper: GPU batch sizes mostly multiples of 4,
    fewer than ~20 GPU batches per block)."""
    gpu_batch_sizes: tuple = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 192, 256, 384,
                              512)
    num_gpu_batches: tuple = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    max_block_size: int = 8192
    allow_act_disk: bool = False      # hidden states on disk never pay; keep them off it
    top_candidates: int = 6           # relaxed optima rounded and compared


@dataclass(frozen=True)
class SearchResult:
    policy: Policy                    # integer percentages
    predicted_throughput: float       # of `policy` (after rounding)
    prediction: Prediction
    relaxed_throughput: float         # the LP optimum of the same shape before rounding
    lps_solved: int
    elapsed_s: float


class DoesNotFit(ValueError):
    """No policy fits the profile's memory; `tier` names the one that is short."""

    def __init__(self, message: str, tier: str):
        super().__init__(message)
        self.tier = tier


def switch_settings(compress: bool) -> list[dict]:
    """CPU attention on/off; with `compress` also 4-bit weights and/or cache (CPU attention stays
    off with a compressed cache: dequantizing on the CPU would cost more than it saves, as the
    paper notes)."""
    out = [dict(cpu_cache_compute=c, compress_weight=False, compress_cache=False) for c in (False, True)]
    if compress:
        out += [dict(cpu_cache_compute=c, compress_weight=True, compress_cache=False) for c in (False, True)]
        out += [dict(cpu_cache_compute=False, compress_weight=w, compress_cache=True) for w in (False, True)]
    return out


def _shape_policy(b: int, k: int, switches: dict) -> Policy:
    return Policy(gpu_batch_size=b, num_gpu_batches=k, w_gpu_percent=100, w_cpu_percent=0,
                  cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100,
                  act_cpu_percent=0, **switches)


def _bounds(allow_act_disk: bool) -> list[tuple]:
    return [(0, 1)] * 8 + [(0, 1 if allow_act_disk else 0), (0, None), (0, None)]


def _lp_rows(model: StepModel, decode: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """Inequality rows over (x, T_pre / scale, T_gen / scale): each time term <= its phase's T
    (`decode`: the decode terms in force), each memory term <= its capacity. Rows are normalized
    (seconds by the largest time coefficient, bytes by the capacity) because HiGHS drops matrix
    entries below 1e-9."""
    terms = list(model.prefill.values()) + list(decode.values())
    scale = max(max(np.abs(t.coef).max(), abs(t.const)) for t in terms) or 1.0
    rows, rhs = [], []
    for col, phase_terms in ((9, model.prefill), (10, decode)):
        for term in phase_terms.values():
            row = np.zeros(NVARS)
            row[:9], row[col] = term.coef / scale, -1.0
            rows.append(row)
            rhs.append(-term.const / scale)
    for name, term in model.memory.items():
        cap = max(model.capacity[name], GIB)
        row = np.zeros(NVARS)
        row[:9] = term.coef / cap
        rows.append(row)
        rhs.append((model.capacity[name] - term.const) / cap)
    return np.array(rows), np.array(rhs), scale


def _sum_rows(nvars: int) -> np.ndarray:
    """wg + wc + wd = cg + cc + cd = hg + hc + hd = 1."""
    a = np.zeros((3, nvars))
    for g in range(3):
        a[g, 3 * g:3 * g + 3] = 1.0
    return a


def solve_placement(model: StepModel, allow_act_disk: bool = False) -> tuple[np.ndarray, float] | None:
    """The relaxed optimum (placement vector, generation seconds) of one shape, or None if no
    placement fits. Where a decode term is charged only while some of the cache is off the GPU
    (HOST_CACHE_STEPS), two programs: every placement with the charge, and the cache held on the
    GPU without it; the faster wins."""
    found = [_solve(model, model.decode, _bounds(allow_act_disk))]
    if HOST_CACHE_STEPS in model.decode:
        bounds = _bounds(allow_act_disk)
        bounds[3] = (1, 1)                          # cg: the whole cache on the GPU
        found.append(_solve(model, model.decode_cache_on_gpu(), bounds))
    found = [f for f in found if f is not None]
    return min(found, key=lambda f: f[1]) if found else None


def _solve(model: StepModel, decode: dict, bounds: list) -> tuple[np.ndarray, float] | None:
    a_ub, b_ub, _ = _lp_rows(model, decode)
    cost = np.zeros(NVARS)
    cost[9], cost[10] = model.num_layers, (model.gen_len - 1) * model.num_layers
    # ties (a tier's traffic hidden under compute) go to the higher tier: a relative 1e-6 nudge
    cost[:9] = TIE_BREAK * model.num_layers * model.gen_len * np.tile([0.0, 1.0, 2.0], 3)
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=_sum_rows(NVARS), b_eq=np.ones(3),
                  bounds=bounds, method="highs")
    if res.status != 0:
        return None
    x = np.clip(res.x[:9], 0.0, 1.0)
    return x, sum(model.total_time(x))


def _min_over_simplex(term, allow_act_disk: bool) -> float:
    """The smallest value an affine term takes over valid placements."""
    coef = term.coef.reshape(3, 3)
    low = coef.min(axis=1)
    if not allow_act_disk:
        low[2] = coef[2, :2].min()
    return term.const + float(low.sum())


def _lower_bound(model: StepModel, allow_act_disk: bool) -> float:
    pre = max(_min_over_simplex(t, allow_act_disk) for t in model.prefill.values())
    dec = max(_min_over_simplex(t, allow_act_disk) for t in model.decode_cache_on_gpu().values())
    return model.num_layers * (pre + (model.gen_len - 1) * dec)


def _surely_infeasible(model: StepModel, allow_act_disk: bool) -> bool:
    return any(_min_over_simplex(t, allow_act_disk) > model.capacity[name] * (1 + 1e-9)
               for name, t in model.memory.items())


def _round_percent(x: np.ndarray, batch: int) -> tuple:
    """Six percentages (gpu, cpu of weights, cache, activations): integer for the weights, and for
    the cache and activations a percentage that split_rows turns into the nearest whole rows of a
    GPU batch of `batch` (see placement.row_percent)."""
    gpu = min(int(round(100 * x[0])), 100)
    out = [gpu, min(max(int(round(100 * (x[0] + x[1]))) - gpu, 0), 100 - gpu)]
    for g in (1, 2):
        rows = min(int(round(x[3 * g] * batch)), batch)
        both = min(max(int(round((x[3 * g] + x[3 * g + 1]) * batch)), rows), batch)
        out += [row_percent(rows, batch), row_percent(both, batch) - row_percent(rows, batch)]
    return tuple(out)


def _with_percent(policy: Policy, pct) -> Policy:
    return dataclasses.replace(policy, w_gpu_percent=pct[0], w_cpu_percent=pct[1],
                               cache_gpu_percent=pct[2], cache_cpu_percent=pct[3],
                               act_gpu_percent=pct[4], act_cpu_percent=pct[5])


def _move(pct, kind: int, src: int, units: int, batch: int) -> tuple:
    """`units` of kind (0 weights: percentage points; 1 cache, 2 activations: rows of a GPU batch
    of `batch`) from tier src (0 GPU, 1 CPU) one tier down."""
    new = list(pct)
    if kind == 0:
        new[src] -= units
        if src == 0:
            new[1] += units
        return tuple(new)
    rows = list(rows_of(pct[2 * kind], pct[2 * kind + 1], batch))
    rows[src] -= units
    if src == 0:
        rows[1] += units
    gpu, both = row_percent(rows[0], batch), row_percent(rows[0] + rows[1], batch)
    new[2 * kind], new[2 * kind + 1] = gpu, both - gpu
    return tuple(new)


def repair(model: StepModel, pct, allow_act_disk: bool = False):
    """Percentages that fit, reached from `pct` by moving weight points or cache and activation
    rows towards the lower tier, or None. Each round moves, for the first tier over its limit, the
    kind of tensor whose move clears the excess at the least time (or, if none can, frees the
    most). Memory and time are evaluated at the placement the runtime realizes."""
    batch = model.gpu_batch_size

    def peak(p, tier):
        return tier_peaks(model, model.placement(p))[0][tier]

    def seconds(p):
        return sum(model.total_time(model.placement(p)))

    for _ in range(MAX_REPAIR_STEPS):
        peaks, caps = tier_peaks(model, model.placement(pct))
        over = [t for t in peaks if peaks[t] > caps[t] * (1 + 1e-9)]
        if not over:
            return pct
        tier = over[0]
        src = {"gpu": 0, "cpu": 1, "gpu+cpu": 1}.get(tier)
        if src is None:
            return None
        excess, options = peaks[tier] - caps[tier], []
        for kind in range(3):
            avail = pct[src] if kind == 0 else rows_of(pct[2 * kind], pct[2 * kind + 1], batch)[src]
            if avail < 1 or (kind == 2 and src == 1 and not allow_act_disk):
                continue
            freed = peaks[tier] - peak(_move(pct, kind, src, 1, batch), tier)
            if freed <= 0:
                continue
            units = min(int(avail), -int(-excess // freed))
            new = _move(pct, kind, src, units, batch)
            fixes = peaks[tier] - peak(new, tier) >= excess
            options.append((not fixes, seconds(new) if fixes else -freed * units, new))
        if not options:
            return None
        pct = min(options)[2]
    return None


def _graphed_seconds(model: StepModel, x: np.ndarray) -> float | None:
    """Generation seconds at a placement the runtime decodes with CUDA graphs (the LP sees only
    the launch-bound decode terms): everything on the GPU (ALL_ON_GPU), or the weights all
    streamed from host memory (STREAMED); None if it does not fit or graphs do not apply."""
    if not model.graphed(x):
        return None
    peaks, caps = tier_peaks(model, x)
    if any(peaks[t] > caps[t] * (1 + 1e-9) for t in peaks):
        return None
    return sum(model.total_time(x))


def _relaxed_candidates(config, profile, prompt_len, gen_len, compress, space):
    """[(seconds per generated token, relaxed placement, shape policy, model)], best first, and the
    number of LPs solved. A shape is skipped when its lower bound cannot enter the
    `space.top_candidates` best relaxed optima, the ones best_policy rounds (a bound on the best
    one alone would skip shapes whose rounding beats a relaxed optimum that rounds badly)."""
    found, solved = [], 0
    tops: list[float] = []          # the best relaxed seconds per token so far, at most top_candidates

    def keep(per_token: float) -> None:
        bisect.insort(tops, per_token)
        del tops[space.top_candidates:]

    def cutoff() -> float:
        return tops[-1] if len(tops) >= space.top_candidates else np.inf
    for switches in switch_settings(compress):
        for b in space.gpu_batch_sizes:
            row_fits = False
            for k in space.num_gpu_batches:
                if b * k > space.max_block_size:
                    break
                shape = _shape_policy(b, k, switches)
                model = build_step_model(config, shape, prompt_len, gen_len, profile)
                if _surely_infeasible(model, space.allow_act_disk):
                    break
                tokens = b * k * gen_len
                for x in (ALL_ON_GPU, STREAMED):   # CUDA-graph decode: faster than the LP says
                    graphed = _graphed_seconds(model, x)
                    if graphed is not None:
                        row_fits = True
                        keep(graphed / tokens)
                        found.append((graphed / tokens, x, shape, model))
                if _lower_bound(model, space.allow_act_disk) / tokens >= cutoff():
                    row_fits = True
                    continue
                solved += 1
                sol = solve_placement(model, space.allow_act_disk)
                if sol is None:
                    break
                row_fits = True
                per_token = sol[1] / tokens
                keep(per_token)
                found.append((per_token, sol[0], shape, model))
            if not row_fits:
                break
    found.sort(key=lambda item: item[0])
    return found, solved


def best_policy(config: OptConfig, profile: HardwareProfile, prompt_len: int, gen_len: int,
                compress: bool = False, gpu_mem_gb: float | None = None,
                cpu_mem_gb: float | None = None, disk_mem_gb: float | None = None,
                space: SearchSpace = SearchSpace()) -> SearchResult:
    """The fastest policy (integer percentages) the cost model finds for this machine.

    `gpu_mem_gb` etc. override the profile's usable memory (GiB), e.g. 16 to emulate a T4 on an
    H100. Raises DoesNotFit (naming the tier) when no policy fits.
    """
    start = time.perf_counter()
    profile = profile.with_memory(gpu_mem_gb, cpu_mem_gb, disk_mem_gb)
    found, solved = _relaxed_candidates(config, profile, prompt_len, gen_len, compress, space)
    best = None
    for rank, (per_token, x, shape, model) in enumerate(found):
        if rank >= space.top_candidates and best is not None:
            break
        pct = repair(model, _round_percent(x, shape.gpu_batch_size), space.allow_act_disk)
        if pct is None:
            continue
        # judged as the policy itself, whose terms may depend on its placement (e.g. whether its
        # weights cross in pieces), not as the shape the LP was built for
        policy = _with_percent(shape, pct)
        pred = evaluate_policy(config, policy, profile, prompt_len, gen_len)
        if best is None or pred.throughput > best[1].throughput:
            best = (policy, pred, 1.0 / per_token)
    if best is None:
        raise diagnose(config, profile, prompt_len, gen_len, compress, space)
    return SearchResult(policy=best[0], predicted_throughput=best[1].throughput, prediction=best[1],
                        relaxed_throughput=best[2], lps_solved=solved,
                        elapsed_s=time.perf_counter() - start)


def _least_use(model: StepModel, tier: str, allow_act_disk: bool) -> float:
    """The smallest peak (bytes) `tier` can have while every other tier stays within its limit."""
    a_ub, b_ub = [], []
    for name, term in model.memory.items():
        row = np.zeros(10)
        row[:9] = term.coef / GIB                      # in GiB, u (column 9) too
        if tier_of(name) == tier:
            row[9] = -1.0
            b_ub.append(-term.const / GIB)
        else:
            b_ub.append((model.capacity[name] - term.const) / GIB)
        a_ub.append(row)
    cost = np.zeros(10)
    cost[9] = 1.0
    res = linprog(cost, A_ub=np.array(a_ub), b_ub=np.array(b_ub), A_eq=_sum_rows(10),
                  b_eq=np.ones(3), bounds=_bounds(allow_act_disk)[:9] + [(0, None)], method="highs")
    return float(res.x[9]) * GIB if res.status == 0 else np.inf


def diagnose(config: OptConfig, profile: HardwareProfile, prompt_len: int, gen_len: int,
             compress: bool, space: SearchSpace = SearchSpace()) -> DoesNotFit:
    """Why nothing fits, at the smallest footprint (one sequence, compression if allowed)."""
    shape = _shape_policy(1, 1, dict(compress_weight=compress, compress_cache=compress))
    model = build_step_model(config, shape, prompt_len, gen_len, profile)
    z = model_sizes(config, shape)
    cache = (prompt_len + gen_len) * z.kv_token * config.num_hidden_layers
    need = z.w_total + cache + prompt_len * z.hid_token
    tiers = {"GPU": profile.gpu_mem_bytes, "CPU": profile.cpu_mem_bytes, "disk": profile.disk_mem_bytes}
    if profile.host_backed_gpu:
        tiers.pop("GPU")
    have = sum(tiers.values())
    what = "4-bit weights" if compress else "weights"
    if need > have:
        parts = " + ".join(f"{t} {v / GIB:.1f}" for t, v in tiers.items())
        return DoesNotFit(
            f"{config.name} does not fit: needs at least {need / GIB:.1f} GiB of "
            f"{'+'.join(tiers)} memory for its {what} and one sequence's cache, the profile "
            f"{profile.name} has {have / GIB:.1f} GiB ({parts})", tier="total")
    short = {}
    for tier in ("gpu", "cpu", "gpu+cpu", "disk"):
        if tier in {tier_of(n) for n in model.memory}:
            cap = profile.cpu_mem_bytes if tier == "gpu+cpu" else getattr(profile, f"{tier}_mem_bytes")
            least = _least_use(model, tier, space.allow_act_disk)
            if least > cap * (1 + 1e-9):
                short[tier] = (least - cap, least, cap)
    if not short:
        return DoesNotFit(f"{config.name} does not fit: no placement keeps GPU, CPU and disk "
                          f"within the limits of {profile.name} together", tier="total")
    tier = min(short, key=lambda t: short[t][0])       # the tier that needs the least added memory
    _, least, cap = short[tier]
    label = {"gpu": "GPU", "cpu": "CPU", "gpu+cpu": "host memory", "disk": "disk"}[tier]
    extra = " (one layer's weights in flight and the attention of one sequence)" if tier == "gpu" else ""
    return DoesNotFit(
        f"{config.name} does not fit: the {label} needs at least {least / GIB:.2f} GiB at GPU batch "
        f"size 1 with prompt {prompt_len}{extra}, the profile {profile.name} has {cap / GIB:.2f} GiB",
        tier=tier)
