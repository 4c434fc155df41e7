"""What a run does: CompressionConfig, Policy (validated where built) and the placement rules
that turn the six percentages into a tier for every weight tensor and a split of every cache and
activation tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Tier(str, Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


TIERS = (Tier.GPU, Tier.CPU, Tier.DISK)


@dataclass(frozen=True)
class CompressionConfig:
    """Group-wise quantization: `num_bits` per value, groups of `group_size` along `group_dim`."""
    num_bits: int = 4
    group_size: int = 64
    group_dim: int = 0
    symmetric: bool = False

    def __post_init__(self):
        if not 2 <= self.num_bits <= 8:
            raise ValueError(f"CompressionConfig.num_bits must be in 2..8, got {self.num_bits}")
        if self.group_size < 1:
            raise ValueError(f"CompressionConfig.group_size must be >= 1, got {self.group_size}")


def _check_percent(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"Policy.{name} must be a number in 0..100, got {value!r}")


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int
    num_gpu_batches: int
    w_gpu_percent: float
    w_cpu_percent: float
    cache_gpu_percent: float
    cache_cpu_percent: float
    act_gpu_percent: float
    act_cpu_percent: float
    overlap: bool = True
    sep_layer: bool = True
    pin_weight: bool = True
    cpu_cache_compute: bool = False
    attn_sparsity: float = 1.0
    compress_weight: bool = False
    comp_weight_config: CompressionConfig = field(default_factory=lambda: CompressionConfig(4, 64, 0, False))
    compress_cache: bool = False
    comp_cache_config: CompressionConfig = field(default_factory=lambda: CompressionConfig(4, 64, 2, False))

    def __post_init__(self):
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Policy.{name} must be an integer >= 1, got {value!r}")
        for what in ("w", "cache", "act"):
            gpu, cpu = f"{what}_gpu_percent", f"{what}_cpu_percent"
            _check_percent(gpu, getattr(self, gpu))
            _check_percent(cpu, getattr(self, cpu))
            if getattr(self, gpu) + getattr(self, cpu) > 100:
                raise ValueError(f"Policy.{gpu} + Policy.{cpu} must be at most 100 (the rest goes "
                                 f"to disk), got {getattr(self, gpu)} + {getattr(self, cpu)}")
        if not 0 < self.attn_sparsity <= 1:
            raise ValueError(f"Policy.attn_sparsity must be in (0, 1], got {self.attn_sparsity!r}")
        if self.compress_cache and self.comp_cache_config.group_dim != 2:
            raise ValueError("Policy.comp_cache_config.group_dim must be 2 (groups along the hidden "
                             f"dimension of a (batch, seq, hidden) cache), got {self.comp_cache_config.group_dim}")

    @property
    def w_disk_percent(self) -> float:
        return 100 - self.w_gpu_percent - self.w_cpu_percent

    @property
    def cache_disk_percent(self) -> float:
        return 100 - self.cache_gpu_percent - self.cache_cpu_percent

    @property
    def act_disk_percent(self) -> float:
        return 100 - self.act_gpu_percent - self.act_cpu_percent

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def percent(self) -> tuple[float, ...]:
        return (self.w_gpu_percent, self.w_cpu_percent, self.cache_gpu_percent,
                self.cache_cpu_percent, self.act_gpu_percent, self.act_cpu_percent)

    def weight_percents(self) -> tuple[float, float, float]:
        return self.w_gpu_percent, self.w_cpu_percent, self.w_disk_percent

    def cache_percents(self) -> tuple[float, float, float]:
        return self.cache_gpu_percent, self.cache_cpu_percent, self.cache_disk_percent

    def act_percents(self) -> tuple[float, float, float]:
        return self.act_gpu_percent, self.act_cpu_percent, self.act_disk_percent


def place_weights(sizes: list[list[int]], percents: tuple[float, float, float]) -> list[list[Tier]]:
    """Give every weight tensor a tier so the whole model's split follows `percents`.

    `sizes[layer][t]` is the byte size of tensor t of a layer. Tensors are walked in model order
    and each goes to the tier whose share of the running total holds its midpoint; the running
    total spans all layers (error diffusion), so the achieved split is within one tensor of the
    request for the whole model, and each layer still gets its share as closely as its tensors allow.
    """
    shares = {tier: pct / 100 for tier, pct in zip(TIERS, percents)}
    done = {tier: 0 for tier in TIERS}
    seen = 0
    placement = []
    for layer in sizes:
        row = []
        for size in layer:
            seen += size
            for tier in TIERS:  # the first tier still below its share at this tensor's midpoint
                if shares[tier] > 0 and done[tier] + size / 2 <= shares[tier] * seen:
                    break
            else:  # rounding left every tier full: the one furthest behind its share
                tier = max((t for t in TIERS if shares[t] > 0),
                           key=lambda t: shares[t] * seen - done[t])
            done[tier] += size
            row.append(tier)
        placement.append(row)
    return placement


def split_rows(n: int, percents: tuple[float, float, float]) -> list[tuple[Tier, int, int]]:
    """Split `n` rows (a batch) over the tiers by percentage: [(tier, start, stop)], empty parts dropped.

    The GPU and CPU parts are rounded to whole rows; the disk takes the rest.
    """
    gpu = round(n * percents[0] / 100)
    cpu = min(n - gpu, round(n * (percents[0] + percents[1]) / 100) - gpu)
    cuts = [(Tier.GPU, 0, gpu), (Tier.CPU, gpu, gpu + cpu), (Tier.DISK, gpu + cpu, n)]
    return [c for c in cuts if c[2] > c[1]]


def parse_percent(values) -> tuple[float, ...]:
    """The six `--percent` numbers, as given on a command line."""
    values = [float(v) for v in values]
    if len(values) != 6:
        raise ValueError(f"--percent takes six numbers (w_gpu w_cpu cache_gpu cache_cpu act_gpu "
                         f"act_cpu), got {len(values)}")
    return tuple(int(v) if v.is_integer() else v for v in values)


# Layers whose weights load ahead of the one computing (overlap): docs/tuning.md has the
# measurements. Two where a policy makes no small host<->GPU copies of its own (whole copies),
# keeps its cache on the GPU and a layer is small: its copy is then short enough that the host's
# per-layer work between one copy's end and the next one's queueing would idle the link. One
# otherwise: deeper prefetch delays the compute stream's small copies (CPU attention, host
# activations) and a host cache's loads, which share the link, and costs memory.
DEEP_PREFETCH_MAX_LAYER_BYTES = 256 << 20


# GPU batches from which a layer's compressed weights are dequantized once per token (dequantize_once)
DEQUANTIZE_ONCE_MIN_BATCHES = 8


def prefetch_layers(policy: Policy, layer_bytes: float) -> int:
    """How many layers' weights load ahead of the computing one (`layer_bytes`: the largest
    layer's weights as stored)."""
    deep = (whole_copies(policy) and policy.cache_gpu_percent >= 100
            and layer_bytes <= DEEP_PREFETCH_MAX_LAYER_BYTES)
    return 2 if deep else 1


def dequantize_once(policy: Policy) -> bool:
    """Whether each layer's compressed weights are dequantized once per token and shared by its
    GPU batches (dense matmuls), rather than read packed by every batch's fused 4-bit matmul:
    from DEQUANTIZE_ONCE_MIN_BATCHES GPU batches on. Dequantizing costs one pass over the layer's
    16-bit bytes and holds them on the GPU while the layer's batches compute; the fused kernel
    rereads the packed bytes for every batch at a rate well below the GPU's memory bandwidth
    (docs/performance-targets.md gives the measured threshold)."""
    return policy.compress_weight and policy.num_gpu_batches >= DEQUANTIZE_ONCE_MIN_BATCHES


def whole_copies(policy: Policy) -> bool:
    """Whether weights and cache loads cross host->GPU as whole copies rather than in pieces.

    Pieces let the compute stream's small host->GPU copies (CPU attention's results, host
    activations) queue between them, at some cost in link rate (docs/tuning.md); a policy that
    makes no such copies (no CPU attention, activations on the GPU) copies whole, a cache in host
    memory included (its loads run on their own channel, not the compute stream). A cache partly
    on disk keeps pieces (its reads were not measured whole)."""
    return (not policy.cpu_cache_compute and policy.act_gpu_percent >= 100
            and policy.cache_disk_percent <= 0)
