"""The cost model's equations: time and peak memory of one layer of a block, as affine functions of
the placement.

The placement is the vector x = (wg, wc, wd, cg, cc, cd, hg, hc, hd): the fractions of weights,
KV cache and activations (hidden states) on GPU, CPU and disk. Everything else (GPU batch size b,
number of GPU batches k, block size B = b k, the switches) is fixed by the Policy the model is built
for. For one layer and the whole block (all k GPU batches), as in the paper (section 4.3, A.3):

    T_layer = max(ctog, gtoc, dtoc, ctod, comp)      (sum instead of max without overlap)

each term summing the bytes a link moves (or the work a processor does) divided by its rate:
weights not on the GPU cross CPU->GPU once per layer per block (shared by the k GPU batches);
disk-resident weights also cross disk->CPU; the cache a GPU batch attends over is loaded unless
attention runs where it lives (cpu_cache_compute: the CPU attends over the CPU and disk parts and
only hidden states move); new cache entries and hidden states are stored to their homes. Compute
is the GPU's matmuls (for each GPU batch the larger of flops / rate and weight bytes / memory
bandwidth), attention on the GPU (batched matmul) or the CPU, 4-bit dequantization, and the
profile's fixed cost per (layer, GPU batch) step (launches, the Python driver). Decode
uses the average cache length s + n/2 over the generated tokens. Totals follow the runtime's metric:

    prefill = layers * T_pre,  decode = (n - 1) * layers * T_gen,
    throughput = B * n / (prefill + decode)      (the prefill step produces the first token)

Per-layer weight bytes are the model's total (embeddings included) divided by the layer count.
Memory: weights, cache and activations at home on each tier, plus working buffers (weights of the
layers in flight, one GPU batch's staged cache and hidden states, the largest intermediate).
Host->GPU copies of caches and hidden states use the pinned rate (the runtime keeps CPU caches
and activations in pinned memory where CUDA exists); CPU-resident and disk-staged weights the
pinned one unless pin_weight is off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flexgen_repro.config import OptConfig
from flexgen_repro.cost_model.hardware import HardwareProfile
from flexgen_repro.policy import CompressionConfig, Policy

PLACEMENT = ("wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd")
TERMS = ("ctog", "gtoc", "dtoc", "ctod", "comp")


class Affine:
    """a . x + c over the placement vector (see PLACEMENT)."""
    __slots__ = ("coef", "const")

    def __init__(self, coef=None, const: float = 0.0):
        self.coef = np.zeros(len(PLACEMENT)) if coef is None else np.asarray(coef, dtype=float)
        self.const = float(const)

    @classmethod
    def of(cls, const: float = 0.0, **terms: float) -> "Affine":
        """Affine.of(5.0, wc=2.0, wd=2.0) is 2 wc + 2 wd + 5."""
        coef = np.zeros(len(PLACEMENT))
        for name, value in terms.items():
            coef[PLACEMENT.index(name)] += value
        return cls(coef, const)

    def __add__(self, other: "Affine") -> "Affine":
        return Affine(self.coef + other.coef, self.const + other.const)

    def __mul__(self, factor: float) -> "Affine":
        return Affine(self.coef * factor, self.const * factor)

    __rmul__ = __mul__

    def __call__(self, x) -> float:
        return float(self.coef @ np.asarray(x, dtype=float) + self.const)


@dataclass(frozen=True, eq=False)
class StepModel:
    """The affine pieces of one layer of a block, and the limits they must keep.

    prefill / decode: seconds per layer (whole block) by term (TERMS). memory: bytes by constraint
    name ("gpu_prefill", ..., "disk"; "gpu+cpu_*" on a host-backed GPU); capacity: the limit of each.
    """
    prefill: dict
    decode: dict
    memory: dict
    capacity: dict
    num_layers: int
    block_size: int
    gen_len: int
    overlap: bool

    def phase_time(self, phase: str, x) -> float:
        values = [term(x) for term in getattr(self, phase).values()]
        return max(values) if self.overlap else sum(values)

    def total_time(self, x) -> tuple[float, float]:
        """(prefill seconds, decode seconds) for the whole generation."""
        pre = self.num_layers * self.phase_time("prefill", x)
        dec = (self.gen_len - 1) * self.num_layers * self.phase_time("decode", x)
        return pre, dec


def compression_ratio(config: CompressionConfig, dtype_bytes: int) -> float:
    """Stored bytes per original byte of a matrix: packed codes plus a scale and an offset per group."""
    codes = math.ceil(config.group_size / (8 // config.num_bits))
    return (codes + 2 * dtype_bytes) / (config.group_size * dtype_bytes)


@dataclass(frozen=True)
class Sizes:
    """Byte and flop counts of the model for one policy's block shape."""
    w_total: float      # all weights as stored (compressed matrices when compress_weight)
    w_layer: float      # w_total / layers
    w_layer_fp: float   # uncompressed weights per layer (read by the GPU for every GPU batch)
    flops_token: float  # matmul flops of one token through one layer
    flops_logits: float  # one token's logits flops divided by the layer count (each layer's share)
    kv_token: float     # stored cache bytes per token per sequence per layer (K and V)
    kv_token_fp: float  # the same uncompressed
    hid_token: float    # hidden-state bytes per token per sequence
    max_part: float     # the larger of attention / MLP weights as a fraction of a layer's


def model_sizes(config: OptConfig, policy: Policy) -> Sizes:
    dt, h, f, L = config.dtype_bytes, config.hidden_size, config.ffn_embed_dim, config.num_hidden_layers
    layer_mat = 4 * h * h + 2 * h * f
    embed_mat = config.vocab_size * h + (config.max_seq_len + 2) * h
    mat = L * layer_mat + embed_mat
    vec = config.num_params() - mat
    rw = compression_ratio(policy.comp_weight_config, dt) if policy.compress_weight else 1.0
    rc = compression_ratio(policy.comp_cache_config, dt) if policy.compress_cache else 1.0
    w_total = mat * dt * rw + vec * dt
    logits = 2.0 * config.vocab_size * h / L
    return Sizes(w_total=w_total, w_layer=w_total / L, w_layer_fp=config.model_bytes() / L,
                 flops_token=2.0 * config.layer_params(), flops_logits=logits,
                 kv_token=2 * h * dt * rc, kv_token_fp=2 * h * dt, hid_token=h * dt,
                 max_part=max(4 * h * h, 2 * h * f) / layer_mat)


def _host_to_gpu(hw: HardwareProfile, p: Policy) -> tuple[float, float]:
    """(rate of caches and hidden states, which the runtime keeps in pinned host memory; rate of
    CPU-resident and disk-staged weights, pinned unless pin_weight is off)."""
    pinned = hw.cpu_to_gpu_bytes_s
    return pinned, pinned if p.pin_weight else hw.cpu_to_gpu_pageable_bytes_s


def _step_overheads(c: OptConfig, p: Policy, hw: HardwareProfile) -> float:
    """Fixed step costs per transformer layer and block: k GPU batches, each running attention
    and MLP as two steps with sep_layer, plus the two embedding steps spread over the layers."""
    steps = (2 if p.sep_layer else 1) + 2 / c.num_hidden_layers
    return p.num_gpu_batches * steps * hw.gpu_step_overhead_s


def _prefill_terms(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes, s: int) -> dict:
    b, k = p.gpu_batch_size, p.num_gpu_batches
    B = b * k
    h2d, h2d_w = _host_to_gpu(hw, p)
    hid, cache_new = B * s * z.hid_token, B * s * z.kv_token
    flops = b * (s * z.flops_token + z.flops_logits)          # logits of the last token only
    mm = k * max(flops / hw.gpu_mm_prefill_flop_s, z.w_layer_fp / hw.gpu_mem_bw_bytes_s)
    attn = B * 4.0 * s * s * c.hidden_size / hw.gpu_bmm_prefill_flop_s
    dequant = (k * z.w_layer_fp if p.compress_weight else 0.0) + \
        (B * s * z.kv_token_fp if p.compress_cache else 0.0)
    mm += _step_overheads(c, p, hw)
    return {
        "ctog": Affine.of(wc=z.w_layer / h2d_w, wd=z.w_layer / h2d) + Affine.of(hc=hid, hd=hid) * (1 / h2d),
        "gtoc": Affine.of(cc=cache_new, cd=cache_new) * (1 / hw.gpu_to_cpu_cache_bytes_s)
        + Affine.of(hc=hid, hd=hid) * (1 / hw.gpu_to_cpu_hidden_bytes_s),
        "dtoc": Affine.of(wd=z.w_layer, hd=hid) * (1 / hw.disk_to_cpu_bytes_s),
        "ctod": Affine.of(cd=cache_new / hw.cpu_to_disk_cache_bytes_s, hd=hid / hw.cpu_to_disk_bytes_s),
        "comp": Affine.of(mm + attn + dequant / hw.gpu_dequant_bytes_s),
    }


def _decode_terms(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes, s: int, n: int) -> dict:
    b, k = p.gpu_batch_size, p.num_gpu_batches
    B = b * k
    avg = s + n / 2                      # average attended length over the generated tokens
    h2d, h2d_w = _host_to_gpu(hw, p)
    hid, read, new = B * z.hid_token, B * avg * z.kv_token, B * z.kv_token
    per_byte = 1 / h2d
    ctog = Affine.of(wc=z.w_layer / h2d_w, wd=z.w_layer * per_byte) + Affine.of(hc=hid, hd=hid) * per_byte
    gtoc = Affine.of(cc=new, cd=new) * (1 / hw.gpu_to_cpu_cache_bytes_s) \
        + Affine.of(hc=hid, hd=hid) * (1 / hw.gpu_to_cpu_hidden_bytes_s)
    flops = b * (z.flops_token + z.flops_logits)
    mm = k * max(flops / hw.gpu_mm_decode_flop_s, z.w_layer_fp / hw.gpu_mem_bw_bytes_s)
    mm += _step_overheads(c, p, hw)
    attn_flops = B * 4.0 * avg * c.hidden_size
    gpu_attn = 1 / hw.gpu_bmm_decode_flop_s
    dequant = k * z.w_layer_fp / hw.gpu_dequant_bytes_s if p.compress_weight else 0.0
    cache_dequant = B * avg * z.kv_token_fp / hw.gpu_dequant_bytes_s if p.compress_cache else 0.0
    if p.cpu_cache_compute:              # CPU attends over the CPU and disk parts; q out, result back
        ctog += Affine.of(cc=hid, cd=hid) * per_byte
        gtoc += Affine.of(cc=hid, cd=hid) * (1 / hw.gpu_to_cpu_hidden_bytes_s)
        off_gpu_attn = attn_flops / hw.cpu_attention_flop_s + cache_dequant
        comp = Affine.of(mm + dequant, cg=attn_flops * gpu_attn + cache_dequant,
                         cc=off_gpu_attn, cd=off_gpu_attn)
    else:                                # the whole cache comes to the GPU
        ctog += Affine.of(cc=read, cd=read) * per_byte
        gpu_side = attn_flops * gpu_attn + cache_dequant
        comp = Affine.of(mm + dequant + gpu_side)
    return {
        "ctog": ctog, "gtoc": gtoc,
        "dtoc": Affine.of(wd=z.w_layer, cd=read, hd=hid) * (1 / hw.disk_to_cpu_bytes_s),
        "ctod": Affine.of(cd=new, hd=hid) * (1 / hw.cpu_to_disk_bytes_s),
        "comp": comp,
    }


def _intermediates(c: OptConfig, b: int, q_len: int, kv_len: int) -> float:
    """The largest transient tensor set of one GPU batch: q_len new tokens attending over kv_len."""
    dt, h, heads = c.dtype_bytes, c.hidden_size, c.n_head
    hid = b * q_len * h * dt
    return max(4 * hid,                                           # x, q, k, v
               b * q_len * kv_len * 2 + 4 * hid,                  # prefill: fused attention, bool mask
               2 * b * heads * kv_len * 4 + 4 * hid,              # decode: one query's fp32 scores
               b * q_len * c.ffn_embed_dim * dt + 2 * hid,        # MLP inner activation
               2 * b * c.vocab_size * 4)                          # logits of the last token (fp32)


def _memory(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes, s: int, n: int) -> dict:
    b, k = p.gpu_batch_size, p.num_gpu_batches
    B, L = b * k, c.num_hidden_layers
    cache = B * (s + n) * z.kv_token * L                       # full-length cache, as allocated
    act = {"prefill": B * s * z.hid_token, "decode": B * z.hid_token}
    tok = {"prefill": s, "decode": 1}
    in_flight = z.w_layer * (1 if p.sep_layer else 2)          # this layer and the next being loaded
    batch_cache = b * (s + n) * z.kv_token
    mem = {}
    for phase in ("prefill", "decode"):
        home = Affine.of(wg=z.w_total, cg=cache, hg=act[phase])
        work = Affine.of(_intermediates(c, b, tok[phase], s if phase == "prefill" else s + n))
        work += Affine.of(wc=in_flight, wd=in_flight)
        work += Affine.of(hc=2 * b * tok[phase] * z.hid_token, hd=2 * b * tok[phase] * z.hid_token)
        if p.compress_weight:
            work += Affine.of(z.w_layer_fp * z.max_part)       # one dequantized layer
        if phase == "prefill":
            work += Affine.of(cc=b * s * z.kv_token, cd=b * s * z.kv_token)
        elif not p.cpu_cache_compute:                          # this and the next batch's cache
            work += Affine.of(cc=2 * batch_cache, cd=2 * batch_cache)
        if phase == "decode" and p.compress_cache:
            fp = b * (s + n) * z.kv_token_fp
            work += Affine.of(cg=fp) if p.cpu_cache_compute else Affine.of(fp)
        mem[f"gpu_{phase}"] = home + work
        staged = b * (s if phase == "prefill" else s + n) * z.kv_token
        cpu = Affine.of(wc=z.w_total, cc=cache, hc=act[phase])
        cpu += Affine.of(wd=2 * z.w_layer, cd=2 * staged, hd=2 * b * tok[phase] * z.hid_token)
        if phase == "decode" and p.cpu_cache_compute:          # fp32 copies of one batch's K, V
            cpu_attn = b * (s + n) * (2 * z.kv_token_fp + 2 * c.n_head * 4)
            cpu += Affine.of(cc=cpu_attn, cd=cpu_attn)
        mem[f"cpu_{phase}"] = cpu
    mem["disk"] = Affine.of(wd=z.w_total, cd=cache, hd=act["prefill"])
    return mem


def _capacities(hw: HardwareProfile, memory: dict) -> tuple[dict, dict]:
    cap = {name: getattr(hw, f"{name.split('_')[0]}_mem_bytes") for name in memory}
    if hw.host_backed_gpu:      # one pool of host memory holds both tiers
        for phase in ("prefill", "decode"):
            memory[f"gpu+cpu_{phase}"] = memory[f"gpu_{phase}"] + memory[f"cpu_{phase}"]
            cap[f"gpu+cpu_{phase}"] = hw.cpu_mem_bytes
    return memory, cap


def build_step_model(config: OptConfig, policy: Policy, prompt_len: int, gen_len: int,
                     profile: HardwareProfile) -> StepModel:
    """The affine time and memory terms of `policy`'s block shape and switches (its percentages
    are ignored here: evaluate the result at a placement vector)."""
    if prompt_len < 1 or gen_len < 1:
        raise ValueError(f"prompt_len and gen_len must be >= 1, got {prompt_len}, {gen_len}")
    if prompt_len + gen_len > config.max_seq_len:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds {config.name}'s "
                         f"max_seq_len {config.max_seq_len}")
    z = model_sizes(config, policy)
    memory, capacity = _capacities(profile, _memory(config, policy, profile, z, prompt_len, gen_len))
    return StepModel(prefill=_prefill_terms(config, policy, profile, z, prompt_len),
                     decode=_decode_terms(config, policy, profile, z, prompt_len, gen_len),
                     memory=memory, capacity=capacity, num_layers=config.num_hidden_layers,
                     block_size=policy.block_size, gen_len=gen_len, overlap=policy.overlap)


def placement_of(policy: Policy) -> np.ndarray:
    """The placement vector x of a policy's six percentages."""
    pct = [v / 100 for v in (*policy.weight_percents(), *policy.cache_percents(), *policy.act_percents())]
    return np.array(pct, dtype=float)
