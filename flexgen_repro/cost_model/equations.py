"""The cost model's equations: time and peak memory of one layer of a block, as affine functions of
the placement.

The placement is the vector x = (wg, wc, wd, cg, cc, cd, hg, hc, hd): the fractions of weights,
KV cache and activations (hidden states) on GPU, CPU and disk. Everything else (GPU batch size b,
number of GPU batches k, block size B = b k, the switches) is fixed by the Policy the model is built
for. For one layer and the whole block (all k GPU batches), as in the paper (section 4.3, A.3):

    T_layer = max(ctog, gtoc, dtoc, ctod, comp)      (sum instead of max without overlap)

(with overlap, decode adds the host memory's own bandwidth as a term, host_memory, and where
they apply the host's cache steps and CPU attention's serial share, as further terms)

each term summing the bytes a link moves (or the work a processor does) divided by its rate:
weights not on the GPU cross CPU->GPU once per layer per block (shared by the k GPU batches);
disk-resident weights also cross disk->CPU; the cache a GPU batch attends over is loaded unless
attention runs where it lives (cpu_cache_compute: the CPU attends over the CPU and disk parts and
only hidden states move); new cache entries and hidden states are stored to their homes. Compute
is the GPU's matmuls (for each GPU batch the larger of flops / rate and weight bytes / memory
bandwidth), attention on the GPU (batched matmul) or the CPU, 4-bit dequantization, and the
profile's fixed cost per (layer, GPU batch) step (launches, the Python driver). Decode
uses the average cache length s + n/2 over the generated tokens; where everything is on the GPU,
or all but weights that stream from pinned host memory (graph_stream.py), the runtime replays
CUDA graphs instead (StepModel.graph_decode: the whole cache buffer is attended, and each step
costs the graph's floor instead of launches). Totals follow the runtime's metric:

    prefill = layers * T_pre,  decode = (n - 1) * layers * T_gen,
    throughput = B * n / (prefill + decode)      (the prefill step produces the first token)

Per-layer weight bytes are the stored total (embeddings included, the token embedding twice, as
the runtime keeps one copy per embedding layer) divided by the layer count.
Memory: weights, cache and activations at home on each tier, plus working buffers. The GPU's peak
is one constraint per phase and step kind (embedding, attention, MLP: _gpu_memory), each what the
runtime holds while such a step computes: the weights of the layers in flight, the step's tensors,
pending cache stores, cache buffers loaded for decode, with allocator fragmentation. A policy is
evaluated at the placement the runtime realizes (placement.py: whole tensors, whole batch rows).
Host->GPU copies of caches and hidden states use the pinned rate (the runtime keeps CPU caches
and activations in pinned memory where CUDA exists); CPU-resident and disk-staged weights the
pinned one unless pin_weight is off.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from flexgen_repro.config import OptConfig
from flexgen_repro.cost_model.hardware import HardwareProfile
from flexgen_repro.cost_model.placement import compression_ratio, layer_tensors, realized_placement
from flexgen_repro.devices.disk_io import PAGE_CACHE_SHARE
from flexgen_repro.graph_stream import SLOT_ALIGN, SLOTS_PER_KIND, stream_switches
from flexgen_repro.policy import Policy, dequantize_once, prefetch_layers, whole_copies

# The tier name of the page-cache constraints (build_step_model's page_cache).
PAGE_CACHE = "page-cache"
PLACEMENT = ("wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd")
TERMS = ("ctog", "gtoc", "dtoc", "ctod", "comp")
# A decode term charged in full wherever any of the cache is off the GPU, and not at all where it
# is all there: not affine in the placement, so the search solves both sides (search.py)
HOST_CACHE_STEPS = "host_cache_steps"
# A decode term: the host memory's own bandwidth, which every byte crossing to or from the host
# tiers passes through (some more than once: _host_memory_passes)
HOST_MEMORY = "host_memory"

# The runtime's buffering, mirrored here (tests/test_cost_model_memory.py checks they match):
MAX_PENDING_STORES = 2      # schedule.MAX_PENDING_STORES: cache stores in flight, each holding K, V
MLP_CHUNK_TOKENS = 4096     # model.layers.MLP_CHUNK_TOKENS: prefill MLP runs in chunks of this many
DECODE_CACHE_BUFFERS = 2    # decode: the cache of this step and of the next one, loaded ahead
# The CUDA caching allocator reserves more than the tensors it holds: freed blocks of one size are
# split for tensors of another, and a segment still partly in use cannot be given back. The GPU
# limit is on reserved memory (the cap is set with set_per_process_memory_fraction), so transient
# memory (everything allocated and freed step by step: weights and caches in flight, pending
# stores, intermediates) counts this much more; homes are allocated once, before the run. On the
# H200, OPT-30B 4x16 with 25% of the cache on the GPU (predicted 14.17 GiB allocated, 14.80 with
# this factor, of the 15.04 usable under a 16 GiB cap) ran with 14.04 GiB allocated while its
# reserved memory reached the cap; without a cap runs reserve 1.3-1.45x their allocated peak,
# cached blocks included that the allocator frees under pressure.
ALLOCATOR_FRAGMENTATION = 1.25
# torch gives each CUDA stream that runs matmuls a cuBLAS workspace from the caching allocator
# (32 MiB each, measured on the H200): the compute stream and the side stream CUDA graphs are
# captured from.
CUBLAS_WORKSPACES = 2 * 32 * (1 << 20)
# Bytes per (b, heads, s, s) score that prefill attention materializes. It calls
# scaled_dot_product_attention with a boolean mask; on CUDA (fp16, head_dim 64 or 128) torch runs
# the memory-efficient kernel, whose only extra is the mask's fp16 form (2 bytes per (b, s, s),
# counted with the mask); the math path would hold 12.5 bytes per score (fp32 copies of q, k, v,
# scores, softmax). Both measured on the H200 with torch 2.11 at OPT-30B's and OPT-1.3B's shapes.
SDPA_SCORE_BYTES = 0.0


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

    prefill / decode: seconds per layer (whole block) by term (TERMS). graph_decode: the decode
    terms where everything is on the GPU and the runtime replays CUDA graphs (None where it
    cannot: no CUDA, sparse attention); graph_streamed: also at STREAMED, the weights all in
    host memory (the policy's switches allow it), whose slots hold slot_bytes of the GPU.
    memory: bytes by constraint name ("gpu_prefill_mlp", ..., "disk"; tier_of gives the tier;
    "gpu+cpu_*" on a host-backed GPU); capacity: the limit of each. weight_tensors and
    gpu_batch_size: what `placement` needs to realize percentages.
    """
    prefill: dict
    decode: dict
    memory: dict
    capacity: dict
    num_layers: int
    block_size: int
    gen_len: int
    overlap: bool
    graph_decode: dict | None = None
    graph_streamed: bool = False
    slot_bytes: float = 0.0
    weight_tensors: tuple = ()
    gpu_batch_size: int = 1
    page_cache: bool = False

    def page_cache_fits(self, x) -> bool:
        """Whether the disk tier at placement x stays within the page cache's share of host
        memory (always true of a model built without `page_cache`)."""
        return all(term(x) <= self.capacity[name] * (1 + 1e-9) for name, term in self.memory.items()
                   if tier_of(name) == PAGE_CACHE)

    def placement(self, percent) -> np.ndarray:
        """The placement vector the runtime realizes for six percentages (placement.py)."""
        return realized_placement(percent, list(self.weight_tensors), self.gpu_batch_size)

    def terms(self, phase: str, x) -> dict:
        """The time terms of `phase` at placement x."""
        if phase == "decode" and self.graphed(x):
            return self.graph_decode
        terms = getattr(self, phase)
        if phase == "decode" and HOST_CACHE_STEPS in terms and cache_on_gpu(x):
            return self.decode_cache_on_gpu()
        return terms

    def graphed(self, x) -> bool:
        """Whether the runtime decodes placement x through CUDA graphs."""
        return self.graph_decode is not None and (
            all_on_gpu(x) or (self.graph_streamed and streams_weights(x)))

    def decode_cache_on_gpu(self) -> dict:
        """The decode terms where the whole cache stays on the GPU (no host cache steps)."""
        return cache_on_gpu_terms(self.decode)

    def phase_time(self, phase: str, x) -> float:
        values = [term(x) for term in self.terms(phase, x).values()]
        return max(values) if self.overlap else sum(values)

    def total_time(self, x) -> tuple[float, float]:
        """(prefill seconds, decode seconds) for the whole generation."""
        pre = self.num_layers * self.phase_time("prefill", x)
        dec = (self.gen_len - 1) * self.num_layers * self.phase_time("decode", x)
        return pre, dec


ALL_ON_GPU = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0], dtype=float)


def cache_on_gpu_terms(terms: dict) -> dict:
    """Decode terms as they stand where the whole cache is on the GPU: without HOST_CACHE_STEPS."""
    return {name: t for name, t in terms.items() if name != HOST_CACHE_STEPS}


def cache_on_gpu(x) -> bool:
    """The whole KV cache on the GPU at placement x."""
    return bool(np.asarray(x, dtype=float)[3] >= 1 - 1e-9)


def all_on_gpu(x) -> bool:
    """Weights, cache and hidden states all on the GPU (graph_decode.graphable's placement)."""
    return bool(np.all(np.asarray(x, dtype=float)[[0, 3, 6]] >= 1 - 1e-9))


STREAMED = np.array([0, 1, 0, 1, 0, 0, 1, 0, 0], dtype=float)


def streams_weights(x) -> bool:
    """Weights all in host memory, cache and hidden states all on the GPU (graph_stream.streamable's
    placement)."""
    return bool(np.all(np.asarray(x, dtype=float)[[1, 3, 6]] >= 1 - 1e-9))


@dataclass(frozen=True)
class Sizes:
    """Byte and flop counts of the model for one policy's block shape."""
    w_total: float      # all weights as the runtime stores them (see placement.layer_tensors)
    w_layer: float      # w_total / layers
    w_layer_fp: float   # uncompressed weights per layer (read by the GPU for every GPU batch)
    flops_token: float  # matmul flops of one token through one layer
    flops_logits: float  # one token's logits flops divided by the layer count (each layer's share)
    kv_token: float     # stored cache bytes per token per sequence per layer (K and V)
    kv_token_fp: float  # the same uncompressed
    hid_token: float    # hidden-state bytes per token per sequence
    w_in_flight: dict   # step kind -> the most weight bytes loaded at once while one computes
    w_slots: float      # graph_stream.WeightSlots' bytes: two of each kind of layer (one if alone)


def weights_in_flight(layers: list[tuple[str, float]], overlap: bool, ahead: int = 1) -> dict:
    """Step kind -> the most weight bytes on the GPU while a layer of that kind computes, for
    layers not kept there: with overlap it and the `ahead` loading ahead (policy.prefetch_layers,
    wrapping to the next token's first layers), without overlap it alone."""
    window = 1 + ahead if overlap else 1
    ring = [size for _, size in layers + layers[:window - 1]]
    out: dict = {}
    for i, (kind, _) in enumerate(layers):
        out[kind] = max(out.get(kind, 0.0), sum(ring[i:i + window]))
    return out


def _ffn(c) -> tuple[int, int]:
    """(MLP width, (tokens, width) intermediates alive at once): OPT's fc1 output and its ReLU;
    SwiGLU's gate, up, silu(gate) and their product."""
    if c.family == "opt":
        return c.ffn_embed_dim, 2
    return c.intermediate_size, 4


def model_sizes(config: OptConfig, policy: Policy) -> Sizes:
    """Bytes and flops per layer of any family: the KV cache per token holds n_kv_head heads."""
    dt, h, L = config.dtype_bytes, config.hidden_size, config.num_hidden_layers
    kv = config.n_kv_head * config.head_dim
    rc = compression_ratio(policy.comp_cache_config, dt) if policy.compress_cache else 1.0
    layers = [(kind, sum(sizes)) for kind, sizes in layer_tensors(config, policy)]
    w_total = sum(size for _, size in layers)
    logits = 2.0 * config.vocab_size * h / L
    return Sizes(w_total=w_total, w_layer=w_total / L, w_layer_fp=config.model_bytes() / L,
                 flops_token=2.0 * config.layer_params(), flops_logits=logits,
                 kv_token=2 * kv * dt * rc, kv_token_fp=2 * kv * dt, hid_token=h * dt,
                 w_in_flight=weights_in_flight(layers, policy.overlap, prefetch_layers(
                     policy, max(size for _, size in layers))),
                 w_slots=weight_slot_bytes(layer_tensors(config, policy)))


def weight_slot_bytes(layers: list[tuple[str, list[float]]]) -> float:
    """The device bytes of streamed-weight graphs' slots (graph_stream.WeightSlots): for each
    kind of layer (the same tensors), two slots of its bytes, or one where a single layer has
    them (the embeddings); each tensor (a compressed one whole) rounded up to the slots'
    alignment."""
    kinds = Counter((kind, tuple(sizes)) for kind, sizes in layers)
    return float(sum(min(SLOTS_PER_KIND, n) * sum(-(-size // SLOT_ALIGN) * SLOT_ALIGN
                                                   for size in sizes)
                     for (_, sizes), n in kinds.items()))


def _host_to_gpu(hw: HardwareProfile, p: Policy) -> tuple[float, float]:
    """(rate of caches and hidden states, which the runtime keeps in pinned host memory; rate of
    CPU-resident and disk-staged weights, pinned unless pin_weight is off). Unpinned weights go
    through pinned staging blocks where the profile says so (`stages_pageable`): at the rate
    profile-hardware measured for that path (`measurements["h2d_staged"]`), else at the slower of
    the pinned link and a host copy (half the host memory bandwidth: it reads and writes each
    byte); without staging, or where the profile has neither, at the pageable rate."""
    pinned = hw.cpu_to_gpu_bytes_s
    m = hw.measurements or {}
    if m.get("h2d_pieces") and not whole_copies(p):
        # the policy's weights and caches cross in pieces, which the link serves below its
        # whole-copy rate: the rate profile-hardware measured for them
        pinned = min(pinned, float(m["h2d_pieces"]))
    if p.pin_weight:
        return pinned, pinned
    if hw.stages_pageable and m.get("h2d_staged"):
        return pinned, float(m["h2d_staged"])
    if hw.stages_pageable and m.get("cpu_mem_bytes_s"):
        return pinned, min(pinned, float(m["cpu_mem_bytes_s"]) / 2)
    return pinned, hw.cpu_to_gpu_pageable_bytes_s


def _disk_weight_rate(hw: HardwareProfile, h2d: float, mapped: bool) -> float:
    """Rate of a disk weight crossing to the GPU: from pinned memory at the link's `h2d`; `mapped`,
    out of its registered mapping (page-cache pages), at the lower of that and the rate
    profile-hardware measured for such a copy (`h2d_mapped`)."""
    measured = (hw.measurements or {}).get("h2d_mapped") if mapped else None
    return min(h2d, float(measured)) if measured else h2d


def _step_overheads(c: OptConfig, p: Policy, hw: HardwareProfile) -> float:
    """Fixed step costs per transformer layer and block: k GPU batches, each running attention
    and MLP as two steps with sep_layer, plus the two embedding steps spread over the layers."""
    steps = (2 if p.sep_layer else 1) + 2 / c.num_hidden_layers
    return p.num_gpu_batches * steps * hw.gpu_step_overhead_s


def _prefill_terms(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes, s: int,
                   mapped: bool = False) -> dict:
    """mapped: the disk tier's files mapped and their weights registered with CUDA, so a weight
    on disk crosses to the GPU straight out of the page cache, at the rate measured for that
    (_disk_weight_rate; no read into host memory first: no disk->host term for it)."""
    b, k = p.gpu_batch_size, p.num_gpu_batches
    B = b * k
    h2d, h2d_w = _host_to_gpu(hw, p)
    h2d_wd = _disk_weight_rate(hw, h2d, mapped)
    hid, cache_new = B * s * z.hid_token, B * s * z.kv_token
    flops = b * (s * z.flops_token + z.flops_logits)          # logits of the last token only
    mm = k * max(flops / hw.gpu_mm_prefill_flop_s, z.w_layer_fp / hw.gpu_mem_bw_bytes_s)
    attn = B * 4.0 * s * s * (c.n_head * c.head_dim) / hw.gpu_bmm_prefill_flop_s
    dequant = (_weight_dequant_bytes(z, p) if p.compress_weight else 0.0) + \
        (B * s * z.kv_token_fp if p.compress_cache else 0.0)
    mm += _step_overheads(c, p, hw)
    weights = Affine.of(wc=z.w_layer / h2d_w, wd=z.w_layer / h2d_wd)
    terms = {
        "ctog": weights + Affine.of(hc=hid, hd=hid) * (1 / h2d),
        "gtoc": Affine.of(cc=cache_new, cd=cache_new) * (1 / hw.gpu_to_cpu_cache_bytes_s)
        + Affine.of(hc=hid, hd=hid) * (1 / hw.gpu_to_cpu_hidden_bytes_s),
        "dtoc": Affine.of(wd=0.0 if mapped else z.w_layer, hd=hid) * (1 / hw.disk_to_cpu_bytes_s),
        "ctod": Affine.of(cd=cache_new / hw.cpu_to_disk_cache_bytes_s, hd=hid / hw.cpu_to_disk_bytes_s),
        "comp": Affine.of(mm + attn + dequant / hw.gpu_dequant_bytes_s) + _prefill_host_hidden(p, hw, z, s, h2d),
    }
    return {**terms, **_prefill_sublayer_terms(c, p, hw, z, terms["comp"], attn, weights, mapped)}


def _prefill_host_hidden(p: Policy, hw: HardwareProfile, z: Sizes, s: int, h2d: float) -> Affine:
    """Seconds per layer that prefill's compute waits for hidden states kept off the GPU.

    Each runtime layer (attention and MLP apart with sep_layer) loads its input from the host and
    stores its output there on the compute stream, in the order of the compute, so these copies
    add to it instead of overlapping it. The outputs' device->host copies also share that
    direction of the link with the prompt's cache stores, which delay them by up to the smaller
    of the two byte counts (taken at the whole prompt's cache: a policy that keeps hidden states
    on the host keeps its cache there too). h2d: the host->GPU rate of hidden states."""
    B = p.gpu_batch_size * p.num_gpu_batches
    moved = (2 if p.sep_layer else 1) * B * s * z.hid_token      # each runtime layer's output
    d2h = hw.gpu_to_cpu_hidden_bytes_s
    seconds = moved / h2d + moved / d2h + min(moved, B * s * z.kv_token) / d2h
    return Affine.of(hc=seconds, hd=seconds)


def attention_share(c: OptConfig) -> float:
    """The attention sublayer's share of a transformer layer's matrices (and of its matmul flops):
    q, k, v, out against the MLP's; OPT: 4 h^2 of 4 h^2 + 2 h f; Llama: (2 h q + 2 h kv) of that
    plus 3 h f (SwiGLU), q and kv the query and key/value widths."""
    h, q, kv = c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    f, _ = _ffn(c)
    attn = 2 * h * q + 2 * h * kv
    return attn / (attn + (2 if c.family == "opt" else 3) * h * f)


def _prefill_sublayer_terms(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes,
                            comp: Affine, attn: float, link: Affine, mapped: bool = False) -> dict:
    """With sep_layer and overlap the runtime loads one sublayer ahead: the MLP's weights load while
    the attention computes, the next attention's while the MLP computes. A layer then takes
    max(load MLP, compute attention) + max(load attention, compute MLP), which exceeds
    max(loads, computes) when the two sublayers are unbalanced; the two cross sums are the terms
    missing from the max (one per link the weights cross: host->GPU, disk->host). The attention
    itself (attn) goes to the attention sublayer, the rest of the compute (matmuls, dequantization,
    step overheads, hidden-state copies) by the matmul share (attention_share). link: a layer's
    weights over host->GPU. mapped: disk weights cross out of the page cache over that link
    (no disk->host sums)."""
    if not (p.sep_layer and p.overlap):
        return {}
    share = attention_share(c)
    matmul = comp + Affine.of(-attn)
    comp_attn, comp_mlp = matmul * share + Affine.of(attn), matmul * (1 - share)
    out = {"sub_link_mlp": link * (1 - share) + comp_mlp, "sub_link_attn": link * share + comp_attn}
    if not mapped:
        disk = Affine.of(wd=z.w_layer / hw.disk_to_cpu_bytes_s)
        out.update(sub_disk_mlp=disk * (1 - share) + comp_mlp, sub_disk_attn=disk * share + comp_attn)
    return out


def _decode_terms(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes, s: int, n: int,
                  mapped: bool = False) -> dict:
    """mapped: the disk tier is read from the page cache through mappings, where CPU attention
    reads its cache in place (the read is part of the attention, not a transfer) and weights
    cross to the GPU straight out of their registered mappings (_prefill_terms)."""
    b, k = p.gpu_batch_size, p.num_gpu_batches
    B = b * k
    avg = s + n / 2                      # average attended length over the generated tokens
    h2d, h2d_w = _host_to_gpu(hw, p)
    h2d_wd = _disk_weight_rate(hw, h2d, mapped)
    hid, read, new = B * z.hid_token, B * avg * z.kv_token, B * z.kv_token
    per_byte = 1 / h2d
    ctog = Affine.of(wc=z.w_layer / h2d_w, wd=z.w_layer / h2d_wd) + Affine.of(hc=hid, hd=hid) * per_byte
    gtoc = Affine.of(cc=new, cd=new) * (1 / hw.gpu_to_cpu_cache_bytes_s) \
        + Affine.of(hc=hid, hd=hid) * (1 / hw.gpu_to_cpu_hidden_bytes_s)
    flops = b * (z.flops_token + z.flops_logits)
    mm = k * max(flops / hw.gpu_mm_decode_flop_s, _decode_weight_seconds(z, p, hw))
    mm += _step_overheads(c, p, hw)
    attn_flops = B * 4.0 * avg * (c.n_head * c.head_dim)
    gpu_attn = _cache_read_share(z, p, hw) / hw.gpu_bmm_decode_flop_s
    dequant, cache_dequant = _decode_dequant(p, hw, z, _weight_dequant_bytes(z, p),
                                             B * avg * z.kv_token_fp)
    extra = {}
    if p.cpu_cache_compute:              # CPU attends over the CPU and disk parts; q out, result back
        ctog += Affine.of(cc=hid, cd=hid) * per_byte
        gtoc += Affine.of(cc=hid, cd=hid) * (1 / hw.gpu_to_cpu_hidden_bytes_s)
        off_gpu_attn = attn_flops / hw.cpu_attention_flop_s + cache_dequant
        comp = Affine.of(mm + dequant, cg=attn_flops * gpu_attn + cache_dequant,
                         cc=off_gpu_attn, cd=off_gpu_attn)
        if p.overlap and p.sep_layer and hw.cpu_attention_batch_overhead_s > 0:
            extra["cpu_attn_serial"] = _cpu_attention_serial(c, p, hw, z, off_gpu_attn)
    else:                                # the whole cache comes to the GPU
        ctog += Affine.of(cc=read, cd=read) * per_byte
        gpu_side = attn_flops * gpu_attn + cache_dequant
        comp = Affine.of(mm + dequant + gpu_side)
        if p.compress_cache and p.overlap and hw.cache_step_host_s > 0:
            # the host's work per GPU batch whose cache crosses: a GPU batch with any of its rows
            # off the GPU loads and stores its cache in pieces each token, whatever their share
            # (a fixed charge: StepModel.terms drops it where the cache is all on the GPU)
            extra[HOST_CACHE_STEPS] = Affine.of(k * hw.cache_step_host_s)
    if p.overlap and (hw.measurements or {}).get("cpu_mem_bytes_s"):
        extra[HOST_MEMORY] = _host_memory_passes(p, z, read, new, hid, mapped) * \
            (1 / float(hw.measurements["cpu_mem_bytes_s"]))
    return {
        "ctog": ctog, "gtoc": gtoc,
        "dtoc": Affine.of(wd=0.0 if mapped else z.w_layer,
                          cd=0.0 if mapped and p.cpu_cache_compute else read, hd=hid)
        * (1 / hw.disk_to_cpu_bytes_s),
        "ctod": Affine.of(cd=new, hd=hid) * (1 / hw.cpu_to_disk_bytes_s),
        "comp": comp,
        **extra,
    }


def _host_memory_passes(p: Policy, z: Sizes, read: float, new: float, hid: float,
                        mapped: bool) -> Affine:
    """Bytes of host memory traffic per decode layer and block (reads and writes both count, as
    profile-hardware's `cpu_mem_bytes_s` counts a copy's). A pinned host weight is read once by
    the link's DMA; an unpinned one is copied into a pinned staging block first (read, write) and
    then read by the DMA: three passes. A disk weight is read out of its registered mapping once,
    or written into pinned memory and read by the DMA: two. A host cache is read by its load (or by
    CPU attention) and written by its store once each; a disk cache twice (through pinned
    buffers). Hidden states: stored and loaded once each, twice on disk."""
    cache = read + new
    return Affine.of(wc=z.w_layer * (1 if p.pin_weight else 3), wd=z.w_layer * (1 if mapped else 2),
                     cc=cache, cd=2 * cache, hc=2 * hid, hd=4 * hid)


def _cpu_attention_serial(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes,
                          off_gpu_attn: float) -> Affine:
    """The attention sublayer with CPU attention, then the next attention weights' load.

    With one sublayer loaded ahead (sep_layer), the next layer's attention weights start loading
    only when this layer's MLP starts, i.e. after the CPU has attended for all k GPU batches, each
    also waiting `cpu_attention_batch_overhead_s` on the main thread. So a layer takes at least
    that attention plus the load of the attention's share of the weights, whatever the link does
    meanwhile (case C's traces). The CPU's share of the rows (cc + cd) scales both CPU
    parts; the weights' share on the host (wc, wd) scales the load."""
    share = attention_share(c)
    h2d, h2d_w = _host_to_gpu(hw, p)
    cpu = off_gpu_attn + p.num_gpu_batches * hw.cpu_attention_batch_overhead_s
    return Affine.of(cc=cpu, cd=cpu, wc=share * z.w_layer / h2d_w, wd=share * z.w_layer / h2d)


def _graph_decode_terms(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes, s: int, n: int,
                        decode: dict) -> dict:
    """Decode as the runtime replays it in CUDA graphs, everything on the GPU (graph_decode.py;
    nothing moves between tiers) or all but weights copied from pinned host memory
    (graph_stream.py; their copies are the decode terms' ctog, kept): each (layer, GPU batch)
    step costs its HBM or flop time plus the graph's per-step floor instead of the launch
    overhead; attention covers the whole cache buffer (s + n positions, the unwritten ones
    masked); one driver step per (token, GPU batch) picks the token (spread over the layers, as
    the embedding steps are)."""
    b, k = p.gpu_batch_size, p.num_gpu_batches
    flops = b * (z.flops_token + z.flops_logits)
    steps = (2 if p.sep_layer else 1) + 2 / c.num_hidden_layers
    per_batch = max(flops / hw.gpu_mm_decode_flop_s, _decode_weight_seconds(z, p, hw, graphed=True)) \
        + steps * hw.gpu_graph_step_overhead_s + hw.gpu_step_overhead_s / c.num_hidden_layers
    attn = (b * k * 4.0 * (s + n) * (c.n_head * c.head_dim) * _cache_read_share(z, p, hw)
            / hw.gpu_bmm_decode_flop_s)
    dequant = sum(_decode_dequant(p, hw, z, k * z.w_layer_fp, b * k * (s + n) * z.kv_token_fp,
                                  graphed=True))
    return {**cache_on_gpu_terms(decode), "comp": Affine.of(k * per_batch + attn + dequant)}


def _decode_weight_seconds(z: Sizes, p: Policy, hw: HardwareProfile, graphed: bool = False) -> float:
    """Seconds the decode matmuls of one layer and GPU batch spend reading weights: compressed
    weights read in place by the fused kernel at its measured rate for the GPU batch (the packed
    bytes), else the dense bytes at HBM rate (also where policy.dequantize_once has dequantized
    them for the layer's batches; CUDA graphs, `graphed`, replay the fused kernels)."""
    if hw.gpu_fused_kernels and p.compress_weight and (graphed or not dequantize_once(p)):
        return z.w_layer / hw.fused_matmul_rate(p.gpu_batch_size)
    return z.w_layer_fp / hw.gpu_mem_bw_bytes_s


def _weight_dequant_bytes(z: Sizes, p: Policy) -> float:
    """16-bit weight bytes a layer's steps dequantize: once per layer with policy.dequantize_once,
    else once per GPU batch (counted only where no fused kernel reads them packed)."""
    return z.w_layer_fp * (1 if dequantize_once(p) else p.num_gpu_batches)


def _cache_read_share(z: Sizes, p: Policy, hw: HardwareProfile) -> float:
    """GPU decode attention is memory-bound: with the fused kernel over a compressed cache it
    reads the packed bytes, this share of the dense ones."""
    return z.kv_token / z.kv_token_fp if hw.gpu_fused_kernels and p.compress_cache else 1.0


def _decode_dequant(p: Policy, hw: HardwareProfile, z: Sizes, weight_fp: float,
                    cache_fp: float, graphed: bool = False) -> tuple[float, float]:
    """(weight, cache) dequantization seconds of a decode step: none where the fused kernels
    read compressed bytes in place (CPU attention over a compressed cache still decompresses);
    weights dequantized once per layer (policy.dequantize_once) are, outside CUDA graphs."""
    once = dequantize_once(p) and not graphed
    weights = weight_fp / hw.gpu_dequant_bytes_s \
        if p.compress_weight and (once or not hw.gpu_fused_kernels) else 0.0
    cache = cache_fp / hw.gpu_dequant_bytes_s if p.compress_cache and (
        not hw.gpu_fused_kernels or p.cpu_cache_compute) else 0.0
    return weights, cache


def _prefill_steps(c: OptConfig, p: Policy, b: int, s: int) -> dict:
    """Step kind -> peak GPU bytes of one prefill (layer, GPU batch) step besides its input
    hidden states, its weights and pending cache stores.

    Attention (model/layers.py SelfAttention, attention_math.prefill_attention): layer norm, q, k,
    v made contiguous per head and one projection in flight: 5 (b, s, h); in the attention kernel
    the boolean (b, s, s) mask and its additive fp16 form, SDPA_SCORE_BYTES per score, then the
    output (b, heads, s, d); after it the merged heads, the out-projection and the residual sum:
    7 (b, s, h).
    MLP: chunks of MLP_CHUNK_TOKENS tokens (layer norm, fc1 and its ReLU copy, fc2, the sum), the
    chunks done and their concatenation. Without sep_layer one step does both, the attention's
    output, K and V alive during the MLP. Embeddings: two lookups and their sum, or the logits.
    With compress_weight, the matrix being dequantized for the matmul, or with
    policy.dequantize_once the step's whole layer dequantized (_dense_layers)."""
    dt, h = c.dtype_bytes, c.hidden_size
    f, inter = _ffn(c)
    hid = b * s * h * dt
    scores = b * c.n_head * s * s * SDPA_SCORE_BYTES
    attention = max(5 * hid + b * s * s * (1 + dt) + scores, 7 * hid)
    tokens = b * s
    chunk = min(tokens, b * max(1, MLP_CHUNK_TOKENS // b))
    mlp = chunk * (inter * f + 2 * h) * dt + (2 * hid if chunk < tokens else 0)
    embed = max(3 * hid, _logits(c, b))
    dense = _dense_layers(c, p)
    steps = {"embed": embed + dense.get("embed", _dequantized(c, p, c.vocab_size * h))}
    if p.sep_layer:
        steps.update(attention=attention + dense.get("attention", _dequantized(c, p, h * h)),
                     mlp=mlp + dense.get("mlp", _dequantized(c, p, h * f)))
    else:
        steps["layer"] = max(attention, mlp + 3 * hid) + dense.get("layer", _dequantized(c, p, h * f))
    return steps


def _dense_layers(c: OptConfig, p: Policy) -> dict:
    """Step kind -> 16-bit bytes of the largest layer of that kind: what policy.dequantize_once
    holds on the GPU while the layer's batches compute ({} without it)."""
    return _largest_layers(c, p.sep_layer) if dequantize_once(p) else {}


@functools.lru_cache(maxsize=64)
def _largest_layers(c: OptConfig, sep_layer: bool) -> dict:
    """Step kind -> 16-bit bytes of the largest uncompressed layer of that kind (per model, not
    per candidate shape: the search asks for it at every shape and phase)."""
    out: dict = {}
    for kind, sizes in layer_tensors(c, Policy(1, 1, 100, 0, 100, 0, 100, 0, sep_layer=sep_layer)):
        out[kind] = max(out.get(kind, 0.0), sum(sizes))
    return out


def _decode_steps(c: OptConfig, p: Policy, b: int, kv_len: int) -> dict:
    """Step kind -> peak GPU bytes of one decode (layer, GPU batch) step besides its input,
    weights and cache: the scores of one query over kv_len positions (fp16 product, with the new
    token, float32, masked, softmax, fp16 probabilities: 18 bytes each) and a few (b, h) vectors;
    the MLP's (b, ffn) pair; the logits. Matmuls on one token read compressed weights in place
    (fused kernel); the input embedding dequantizes the token embedding; with
    policy.dequantize_once each step holds its whole layer dequantized (_dense_layers)."""
    dt, h = c.dtype_bytes, c.hidden_size
    f, inter = _ffn(c)
    attention = 18 * b * c.n_head * kv_len + 8 * b * h * dt
    mlp = b * (inter * f + 2 * h) * dt
    dense = _dense_layers(c, p)
    steps = {"embed": _logits(c, b) + dense.get("embed", _dequantized(c, p, c.vocab_size * h))}
    if p.sep_layer:
        steps.update(attention=attention + dense.get("attention", 0.0), mlp=mlp + dense.get("mlp", 0.0))
    else:
        steps["layer"] = max(attention, mlp) + dense.get("layer", 0.0)
    return steps


def _logits(c: OptConfig, b: int) -> float:
    """The last token's logits (b, vocab), in the model's dtype and a float32 copy to pick from."""
    return b * c.vocab_size * (c.dtype_bytes + 4)


def _dequantized(c: OptConfig, p: Policy, numel: int) -> float:
    """A compressed matrix of `numel` values dequantized for a matmul (compress_weight)."""
    return numel * c.dtype_bytes if p.compress_weight else 0.0


def _gpu_memory(c: OptConfig, p: Policy, z: Sizes, s: int, n: int, phase: str) -> dict:
    """Step kind -> peak GPU bytes of a phase while a layer of that kind computes: homes (weights,
    the full-length cache, the hidden states of every GPU batch) and cuBLAS workspaces, plus
    transient memory times ALLOCATOR_FRAGMENTATION: weights in flight, the current batch's input
    when it comes from the CPU or disk, the step's tensors, and the K, V of pending cache stores
    (prefill, overlap; the newest are the attention step's own K, V, counted once) or the cache
    loaded from the CPU or disk (decode without CPU attention: whole (b, heads, s + n, d)
    buffers, this step's and the next one's)."""
    b, k = p.gpu_batch_size, p.num_gpu_batches
    tok = s if phase == "prefill" else 1
    batch_hidden = b * tok * z.hid_token
    cache = b * k * (s + n) * z.kv_token * c.num_hidden_layers
    home = Affine.of(CUBLAS_WORKSPACES, wg=z.w_total, cg=cache, hg=k * batch_hidden)
    steps = _prefill_steps(c, p, b, s) if phase == "prefill" else _decode_steps(c, p, b, s + n)
    buffer = b * (s + n) * z.kv_token
    out = {}
    for kind, step in steps.items():
        w = z.w_in_flight[kind]
        work = Affine.of(step, wc=w, wd=w, hc=batch_hidden, hd=batch_hidden)
        if phase == "prefill" and p.overlap:
            # the stores in flight hold their K and V; an attention step's own (the newest) are
            # among its step tensors already (_prefill_steps), so it holds one fewer besides
            stores = MAX_PENDING_STORES - (1 if kind in ("attention", "layer") else 0)
            work += Affine.of(stores * b * s * z.kv_token_fp)
        if phase == "decode" and not p.cpu_cache_compute:
            loaded = buffer * (DECODE_CACHE_BUFFERS if kind in ("attention", "layer") else 1)
            work += Affine.of(cc=loaded, cd=loaded)
        out[kind] = home + work * ALLOCATOR_FRAGMENTATION
    return out


def tier_of(name: str) -> str:
    """The tier of a memory constraint: "gpu_prefill_mlp" -> "gpu", "gpu+cpu_decode" -> "gpu+cpu"."""
    return name.split("_")[0]


def _memory(c: OptConfig, p: Policy, hw: HardwareProfile, z: Sizes, s: int, n: int) -> dict:
    b, k = p.gpu_batch_size, p.num_gpu_batches
    B, L = b * k, c.num_hidden_layers
    cache = B * (s + n) * z.kv_token * L                       # full-length cache, as allocated
    act = {"prefill": B * s * z.hid_token, "decode": B * z.hid_token}
    tok = {"prefill": s, "decode": 1}
    mem = {}
    for phase in ("prefill", "decode"):
        for kind, term in _gpu_memory(c, p, z, s, n, phase).items():
            mem[f"gpu_{phase}_{kind}"] = term
        staged = b * (s if phase == "prefill" else s + n) * z.kv_token
        cpu = Affine.of(wc=z.w_total, cc=cache, hc=act[phase])
        cpu += Affine.of(wd=2 * z.w_layer, cd=2 * staged, hd=2 * b * tok[phase] * z.hid_token)
        if phase == "decode" and p.cpu_cache_compute:          # fp32 copies of one batch's K, V
            cpu_attn = b * (s + n) * (2 * z.kv_token_fp + 2 * c.n_head * 4)
            cpu += Affine.of(cc=cpu_attn, cd=cpu_attn)
        mem[f"cpu_{phase}"] = cpu
    mem["disk"] = Affine.of(wd=z.w_total, cd=cache, hd=act["prefill"])
    return mem


def _page_cache_memory(hw: HardwareProfile, memory: dict) -> tuple[dict, dict]:
    """The constraints under which the runtime maps every disk file (DiskDevice under "auto"):
    the disk tier within PAGE_CACHE_SHARE of the host memory the CPU tier leaves free, in each
    phase (bytes, capacity)."""
    extra = {f"{PAGE_CACHE}_{phase}": memory["disk"] + memory[f"cpu_{phase}"] * PAGE_CACHE_SHARE
             for phase in ("prefill", "decode")}
    return extra, {name: PAGE_CACHE_SHARE * hw.cpu_mem_bytes for name in extra}


def _capacities(hw: HardwareProfile, memory: dict) -> tuple[dict, dict]:
    cap = {name: getattr(hw, f"{tier_of(name)}_mem_bytes") for name in memory}
    if hw.host_backed_gpu:      # one pool of host memory holds both tiers
        for name in [n for n in memory if tier_of(n) == "gpu"]:
            phase = name.split("_")[1]
            memory[f"gpu+cpu_{name[4:]}"] = memory[name] + memory[f"cpu_{phase}"]
            cap[f"gpu+cpu_{name[4:]}"] = hw.cpu_mem_bytes
    return memory, cap


def page_cache_rates(hw: HardwareProfile) -> HardwareProfile:
    """`hw` with its disk rates replaced by the page cache's (the mapped files' reads and writes)."""
    return dataclasses.replace(hw, disk_to_cpu_bytes_s=hw.page_cache_read_bytes_s,
                               cpu_to_disk_cache_bytes_s=hw.page_cache_write_bytes_s,
                               cpu_to_disk_bytes_s=hw.page_cache_write_bytes_s)


def build_step_model(config: OptConfig, policy: Policy, prompt_len: int, gen_len: int,
                     profile: HardwareProfile, page_cache: bool = False) -> StepModel:
    """The affine time and memory terms of `policy`'s block shape and switches (its percentages
    are ignored here: evaluate the result at a placement vector).

    page_cache: the disk tier as the runtime runs it when it fits in the page cache's share of
    host memory (every file mapped): disk traffic at the profile's page-cache rates, CPU
    attention over a disk cache in place, weights on disk crossing to the GPU out of their
    registered mappings at the link's rate (devices/disk_io.DiskFile.pinned_view), and
    constraints ("page-cache_*") that keep the disk tier within that share. Needs a profile
    with page-cache rates. Predictions of a given policy use it where its disk tier fits
    (predict.policy_model); the search does not need it:
    host memory free for the page cache would hold the same bytes in the CPU tier, which
    crosses to the GPU faster still."""
    if page_cache and not profile.has_page_cache_rates:
        raise ValueError(f"profile {profile.name} has no page-cache rates; re-run "
                         f"`invoke profile-hardware` to measure them")
    if prompt_len < 1 or gen_len < 1:
        raise ValueError(f"prompt_len and gen_len must be >= 1, got {prompt_len}, {gen_len}")
    if prompt_len + gen_len > config.max_seq_len:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds {config.name}'s "
                         f"max_seq_len {config.max_seq_len}")
    z = model_sizes(config, policy)
    memory, capacity = _capacities(profile, _memory(config, policy, profile, z, prompt_len, gen_len))
    if page_cache:
        extra, extra_cap = _page_cache_memory(profile, memory)
        memory, capacity = {**memory, **extra}, {**capacity, **extra_cap}
        profile = page_cache_rates(profile)
    decode = _decode_terms(config, policy, profile, z, prompt_len, gen_len, mapped=page_cache)
    graphs = not profile.host_backed_gpu and policy.attn_sparsity == 1.0
    return StepModel(prefill=_prefill_terms(config, policy, profile, z, prompt_len, page_cache),
                     decode=decode,
                     memory=memory, capacity=capacity, num_layers=config.num_hidden_layers,
                     block_size=policy.block_size, gen_len=gen_len, overlap=policy.overlap,
                     graph_decode=_graph_decode_terms(config, policy, profile, z, prompt_len,
                                                      gen_len, decode) if graphs else None,
                     graph_streamed=graphs and stream_switches(policy), slot_bytes=z.w_slots,
                     weight_tensors=tuple(sizes for _, sizes in layer_tensors(config, policy)),
                     gpu_batch_size=policy.gpu_batch_size, page_cache=page_cache)
