"""The placement a policy's six percentages become in the runtime, which the cost model evaluates.

Weight tensors go whole to one tier (policy.place_weights over every tensor in execution order),
so the achieved split of the weight bytes is within one tensor of the request; the KV cache and
the hidden states are split by whole rows of a GPU batch (policy.split_rows), so with
gpu_batch_size 12 a cache request of 21% on the GPU keeps 3 rows (25%) there.
"""
from __future__ import annotations

import math

import numpy as np

from flexgen_repro.config import OptConfig
from flexgen_repro.policy import CompressionConfig, Policy, place_weights, split_rows


def compression_ratio(config: CompressionConfig, dtype_bytes: int) -> float:
    """Stored bytes per original byte of a matrix: packed codes plus a scale and an offset per group."""
    codes = math.ceil(config.group_size / (8 // config.num_bits))
    return (codes + 2 * dtype_bytes) / (config.group_size * dtype_bytes)


def layer_tensors(config: OptConfig, policy: Policy) -> list[tuple[str, list[float]]]:
    """(step kind, stored bytes of each weight tensor in the order of its specs) of each runtime
    layer in execution order (model/layers.py build_layers, any family; every transformer layer
    has layer 0's shapes): the input embedding
    ("embed"), per transformer layer its attention and MLP (one "layer" without sep_layer), the
    output embedding, which loads its own copy of the token embedding (or the untied lm_head).
    Matrices (embeddings too) are compressed with compress_weight, vectors never."""
    from flexgen_repro.model import families
    dt = config.dtype_bytes
    rw = compression_ratio(policy.comp_weight_config, dt) if policy.compress_weight else 1.0
    mat, vec = dt * rw, dt

    def sizes(specs) -> list[float]:
        return [s.numel * (mat if len(s.shape) >= 2 else vec) for s in specs]
    attn, mlp = sizes(families.attention_specs(config, 0)), sizes(families.mlp_specs(config, 0))
    blocks = [("attention", attn), ("mlp", mlp)] if policy.sep_layer else [("layer", attn + mlp)]
    return ([("embed", sizes(families.input_specs(config)))] + blocks * config.num_hidden_layers
            + [("embed", sizes(families.output_specs(config)))])


def row_percent(rows: int, batch: int) -> float:
    """An integer percentage that split_rows turns into `rows` of `batch` where one exists."""
    pct = round(100 * rows / batch)
    return pct if round(batch * pct / 100) == rows else 100 * rows / batch


def rows_of(gpu_pct: float, cpu_pct: float, batch: int) -> tuple[int, int]:
    """(GPU rows, CPU rows) of a batch split by (gpu_pct, cpu_pct), as split_rows cuts it."""
    rows = {tier.value: stop - start for tier, start, stop in
            split_rows(batch, (gpu_pct, cpu_pct, 100 - gpu_pct - cpu_pct))}
    return rows.get("gpu", 0), rows.get("cpu", 0)


def realized_placement(percent, tensors: list[list[float]], batch: int) -> np.ndarray:
    """The placement vector (wg, wc, wd, cg, cc, cd, hg, hc, hd) the runtime realizes for six
    percentages: weight fractions by bytes of the whole tensors each tier gets (`tensors`: sizes
    per layer), cache and hidden-state fractions by rows of a GPU batch of `batch`."""
    w_pct = (percent[0], percent[1], 100 - percent[0] - percent[1])
    total = {tier: 0.0 for tier in ("gpu", "cpu", "disk")}
    for sizes, tiers in zip(tensors, place_weights(tensors, w_pct)):
        for size, tier in zip(sizes, tiers):
            total[tier.value] += size
    weights = np.array(list(total.values())) / (sum(total.values()) or 1.0)
    x = list(weights)
    for g in (2, 4):
        gpu, cpu = rows_of(percent[g], percent[g + 1], batch)
        x += [gpu / batch, cpu / batch, (batch - gpu - cpu) / batch]
    return np.array(x)
