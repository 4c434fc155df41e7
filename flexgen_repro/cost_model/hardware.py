"""Hardware profiles for the cost model: the HardwareProfile dataclass, reading and writing its JSON,
and the named profiles (shipped with the package: `t4-paper`, the paper's T4 machine, `h100`,
measured on an H100 80GB machine, and `h200`, measured on an H200 machine; `local`, measured on
this machine by `invoke profile-hardware`).

Units are SI base units throughout: bytes, bytes per second, floating-point operations per second.
Memory figures are what the runtime may use for tensors (not the nominal size of the part).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

GIB = float(1 << 30)
TERA = 1e12
PROFILES_DIR = os.path.join(os.path.dirname(__file__), "profiles")
BUILTIN_PROFILES = ("t4-paper", "h100", "h200")
LOCAL_PROFILE = "~/.cache/flexgen_repro/hardware_local.json"

# Every rate the equations divide by; each must be > 0.
RATE_FIELDS = (
    "cpu_to_gpu_bytes_s", "cpu_to_gpu_pageable_bytes_s", "gpu_to_cpu_cache_bytes_s",
    "gpu_to_cpu_hidden_bytes_s", "disk_to_cpu_bytes_s", "cpu_to_disk_cache_bytes_s",
    "cpu_to_disk_bytes_s", "gpu_mem_bw_bytes_s", "gpu_mm_prefill_flop_s", "gpu_mm_decode_flop_s",
    "gpu_bmm_prefill_flop_s", "gpu_bmm_decode_flop_s", "cpu_attention_flop_s", "gpu_dequant_bytes_s",
)
MEMORY_FIELDS = ("gpu_mem_bytes", "cpu_mem_bytes", "disk_mem_bytes", "gpu_step_overhead_s",
                 "gpu_graph_step_overhead_s", "cpu_attention_batch_overhead_s",
                 "cache_step_host_s")
# Rates a profile may leave at 0 (not measured): the model does without them (the disk tier at the
# drive's rates; the fused matmul at HBM rate).
OPTIONAL_RATE_FIELDS = ("page_cache_read_bytes_s", "page_cache_write_bytes_s",
                        "gpu_fused_matmul_bytes_s")
# Seconds per (layer, GPU batch) decode step replayed in a CUDA graph beyond its HBM time, for
# profiles that do not measure it: the two all-GPU graph-decode runs on the H200
# (results/h100-anchors/raw, prompt 512) leave the same floor once their weight and attention
# time is taken out: OPT-6.7B 2x1, 6.44 ms per token = 3.32 ms of weights at 4.04 TB/s + 64 layer
# steps x 47.5 us; OPT-1.3B 16x1, 3.44 ms = 0.65 ms + 0.50 ms of attention + 48 steps x 47.7 us.
# (Scaling the HBM time by one efficiency instead, 0.53 from OPT-6.7B, predicts OPT-1.3B at 1.7 ms.)
# profile-hardware's stand-in layers read 37.5 us on the same card, at both widths it tries: the
# runtime's steps launch a few more kernels than the stand-in, so measured profiles predict
# all-GPU decode about 10% fast.
GRAPH_STEP_OVERHEAD_S = 47.5e-6


@dataclass(frozen=True)
class HardwareProfile:
    """One machine as the cost model sees it (see the module docstring for units).

    Bandwidths: `cpu_to_gpu` (pinned host memory) and its pageable counterpart; GPU->CPU for the
    KV cache and for hidden states; disk->CPU reads; CPU->disk writes of the prefill cache and of
    everything else. `gpu_mem_bw` bounds memory-bound matmuls (every weight byte is read once per
    GPU batch). Rates: dense matmul (prefill- and decode-shaped), attention's batched matmul on the
    GPU (prefill, decode) and on the CPU, and 4-bit dequantization (fp16 bytes produced per second).
    `gpu_step_overhead_s`: fixed cost of one (layer, GPU batch) step (kernel launches, the Python
    driver, one synchronization), which dominates small models on fast GPUs.
    `gpu_graph_step_overhead_s`: the same step replayed in a CUDA graph (the runtime's decode where
    everything is on the GPU): the floor of its small kernels, with no launches or driver.
    `cpu_attention_batch_overhead_s`: with CPU attention overlapped (a worker thread attends
    while the main thread prepares the next GPU batch), the time per (layer, GPU batch) the worker
    still waits on the main thread (its synchronous copy of q, k, v to the host, queueing, finishing
    the previous batch). Fitted from runs where measured (h100); 0 leaves the term out.
    `cache_step_host_s`: host time of one decode (layer, GPU batch) step whose 4-bit cache crosses
    the link both ways each token (loaded from and stored to the host, no CPU attention): the
    main thread queueing the layer's kernels while the cache threads issue the load and the
    store's quantize, copies and host writes, all under one interpreter lock. Where the GPU
    batches are small this, not the link or the GPU, sets the step. Fitted from runs where
    measured (h100); 0 leaves the term out.
    `page_cache_read_bytes_s`, `page_cache_write_bytes_s`: the disk tier's files while the page
    cache holds them (the runtime maps the files that fit in disk_io.PAGE_CACHE_SHARE of the free
    host memory; equations.build_step_model's `page_cache`); 0: not measured, every disk byte
    moves at the drive's rates.
    `gpu_fused_matmul_bytes_s`: packed weight bytes per second the fused 4-bit decode matmul reads
    (kernels.dequant_linear over one OPT-6.7B-wide layer's matrices at a decode batch;
    profile.measure_fused_matmul); 0: not measured, the HBM rate is used.
    `gpu_fused_matmul_batches`: the same rate measured at several decode batches, [[batch, bytes
    per second], ...] in rising batch order (it falls several-fold from one row to a hundred:
    the kernel's tiles change with the batch); where present, `fused_matmul_rate(batch)` reads
    it, else every batch gets `gpu_fused_matmul_bytes_s`.
    `gpu_headroom`: the
    fraction of a GPU memory cap (`with_memory(gpu_gb=...)`) usable for tensors.
    `host_backed_gpu`: no CUDA; the "GPU" tier is host memory, so GPU and CPU share `cpu_mem_bytes`.
    `gpu_fused_kernels`: the runtime's fused 4-bit kernels run here (CUDA and Triton): decode
    matmuls and attention read compressed weights and cache in place, at HBM rate, with no
    separate dequantization (the original's unfused torch path, and the t4-paper profile: False).
    `stages_pageable`: unpinned weights bound for the GPU cross through pinned staging blocks (the
    runtime's path); False: straight from pageable memory, at `cpu_to_gpu_pageable_bytes_s`.
    """
    name: str
    gpu_mem_bytes: float
    cpu_mem_bytes: float
    disk_mem_bytes: float
    cpu_to_gpu_bytes_s: float
    cpu_to_gpu_pageable_bytes_s: float
    gpu_to_cpu_cache_bytes_s: float
    gpu_to_cpu_hidden_bytes_s: float
    disk_to_cpu_bytes_s: float
    cpu_to_disk_cache_bytes_s: float
    cpu_to_disk_bytes_s: float
    gpu_mem_bw_bytes_s: float
    gpu_mm_prefill_flop_s: float
    gpu_mm_decode_flop_s: float
    gpu_bmm_prefill_flop_s: float
    gpu_bmm_decode_flop_s: float
    cpu_attention_flop_s: float
    gpu_dequant_bytes_s: float
    gpu_step_overhead_s: float = 0.0
    gpu_graph_step_overhead_s: float = GRAPH_STEP_OVERHEAD_S
    gpu_headroom: float = 1.0
    cpu_mm_flop_s: float = 0.0
    cpu_attention_batch_overhead_s: float = 0.0
    cache_step_host_s: float = 0.0
    page_cache_read_bytes_s: float = 0.0
    page_cache_write_bytes_s: float = 0.0
    gpu_fused_matmul_bytes_s: float = 0.0
    gpu_fused_matmul_batches: list = field(default_factory=list)
    host_backed_gpu: bool = False
    gpu_fused_kernels: bool = False
    stages_pageable: bool = True
    description: str = ""
    sources: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"HardwareProfile.{name} must be a number > 0, got {value!r}")
        for name in MEMORY_FIELDS + OPTIONAL_RATE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"HardwareProfile.{name} must be a number >= 0, got {value!r}")
        points = self.gpu_fused_matmul_batches
        pairs = isinstance(points, (list, tuple)) and all(
            isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], int) and e[0] > 0
            and isinstance(e[1], (int, float)) and e[1] > 0 for e in points)
        if not pairs or [e[0] for e in points] != sorted({e[0] for e in points}):
            raise ValueError("HardwareProfile.gpu_fused_matmul_batches must be [[batch, bytes per "
                             "second], ...] with whole batches > 0 in rising order and rates > 0, "
                             f"got {self.gpu_fused_matmul_batches!r}")
        if not 0 < self.gpu_headroom <= 1:
            raise ValueError(f"HardwareProfile.gpu_headroom must be in (0, 1], got {self.gpu_headroom!r}")

    @property
    def fused_matmul_bytes_s(self) -> float:
        """The rate the fused 4-bit decode matmul reads packed weights at: measured, else HBM's."""
        return self.gpu_fused_matmul_bytes_s or self.gpu_mem_bw_bytes_s

    def fused_matmul_rate(self, batch: int) -> float:
        """The fused 4-bit decode matmul's rate (packed bytes per second) at a decode batch of
        `batch` rows: between two measured batches, seconds per byte interpolated linearly; below
        the first or above the last, that end's rate; with no batches measured,
        `fused_matmul_bytes_s`."""
        points = self.gpu_fused_matmul_batches
        if not points:
            return self.fused_matmul_bytes_s
        if batch <= points[0][0]:
            return float(points[0][1])
        for (b0, r0), (b1, r1) in zip(points, points[1:]):
            if batch <= b1:
                t = (batch - b0) / (b1 - b0)
                return 1.0 / ((1 - t) / r0 + t / r1)
        return float(points[-1][1])

    @property
    def has_page_cache_rates(self) -> bool:
        return self.page_cache_read_bytes_s > 0 and self.page_cache_write_bytes_s > 0

    def with_memory(self, gpu_gb: float | None = None, cpu_gb: float | None = None,
                    disk_gb: float | None = None) -> "HardwareProfile":
        """A copy with some tiers' memory replaced (GiB), e.g. a 16 GiB cap on an 80 GB card; of a
        GPU cap, the `gpu_headroom` fraction is usable."""
        changes = {}
        for key, value, usable in (("gpu_mem_bytes", gpu_gb, self.gpu_headroom),
                                   ("cpu_mem_bytes", cpu_gb, 1.0), ("disk_mem_bytes", disk_gb, 1.0)):
            if value is not None:
                if value < 0:
                    raise ValueError(f"memory cap must be >= 0 GiB, got {value}")
                changes[key] = float(value) * GIB * usable
        if not changes:
            return self
        given = {"gpu": gpu_gb, "cpu": cpu_gb, "disk": disk_gb}
        tag = ",".join(f"{k}={v:g}GiB" for k, v in given.items() if v is not None)
        return dataclasses.replace(self, name=f"{self.name}[{tag}]", **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def profile_from_dict(data: dict, origin: str = "profile") -> HardwareProfile:
    """Build a profile from its JSON object; unknown keys are an error (a typo must not pass)."""
    known = {f.name for f in dataclasses.fields(HardwareProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{origin}: unknown keys {unknown}; valid keys are {sorted(known)}")
    missing = sorted(f.name for f in dataclasses.fields(HardwareProfile)
                     if f.name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{origin}: missing keys {missing}")
    return HardwareProfile(**data)


def save_profile(profile: HardwareProfile, path: str) -> str:
    """Write `profile` as JSON to `path` (folders made as needed); returns the expanded path."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(profile.to_json(), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _read_json(path: str) -> HardwareProfile:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `invoke profile-hardware`") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold one JSON object")
    return profile_from_dict(data, origin=path)


def load_profile(name_or_path: str) -> HardwareProfile:
    """A shipped profile (BUILTIN_PROFILES), `local` (the measured profile of this machine) or a
    path to a profile JSON file."""
    if name_or_path in BUILTIN_PROFILES:
        return _read_json(os.path.join(PROFILES_DIR, f"{name_or_path}.json"))
    if name_or_path == "local":
        path = os.path.expanduser(LOCAL_PROFILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no measured profile at {path}: run `invoke profile-hardware` first "
                f"(or pass --hardware t4-paper or a profile JSON file)")
        return _read_json(path)
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        return _read_json(path)
    raise ValueError(f"unknown hardware profile {name_or_path!r}: choose one of "
                     f"{list(BUILTIN_PROFILES) + ['local']} or pass a profile JSON file")
