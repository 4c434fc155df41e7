"""The hardware limit of a case: how fast its decode could go if every byte it must move per step
moved at the machine's measured bandwidth, and which transfer binds it.

Per decode step (one new token for each of the block's gpu_batch_size x num_gpu_batches sequences)
every weight byte not resident on the GPU crosses PCIe once (disk-resident ones are read from disk
first); the KV cache not on the GPU crosses PCIe, unless attention runs on the CPU, where it is read
from host memory instead; activations placed off the GPU go out and back; and the GPU reads its
weights once per GPU batch plus its cache from its own memory. So

    limit_throughput = block tokens / max over resources (sum of the seconds of its terms)

with the terms' bytes divided by the bandwidths of a hardware profile (GB/s = 1e9 bytes/s). Terms
that use one resource add up: every host->GPU transfer (weights, cache, activations, from pinned or
pageable memory) shares the link's one direction, and the host copies of CPU attention and of
staged weights share host memory. The binding term names the binding resource's terms, largest
first. The limit is per decode step, so it is compared with the measured decode throughput.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields

from flexgen_repro.bench.fit import stored_bytes
from flexgen_repro.config import OptConfig, get_model_config
from flexgen_repro.policy import CompressionConfig, parse_percent

GB = 1e9
WEIGHT_COMP = CompressionConfig(4, 64, 0, False)
CACHE_COMP = CompressionConfig(4, 64, 2, False)


@dataclass(frozen=True)
class Bandwidths:
    """A machine's transfer rates in GB/s (None where not measured) and where they come from."""
    name: str
    h2d_gbps: float
    d2h_gbps: float
    cpu_mem_gbps: float | None = None
    disk_read_gbps: float | None = None
    disk_write_gbps: float | None = None
    gpu_mem_gbps: float | None = None
    h2d_pageable_gbps: float | None = None  # host->GPU from pageable memory (`--pin-weight false`)
    source: str = ""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_gbps") and value is not None and not value > 0:
                raise ValueError(f"Bandwidths.{f.name} must be > 0 GB/s (or None), got {value!r}")


# Figures measured on the H100 machine of the original FlexGen's reference runs (its figures are
# the h100-anchors suite's references), for H100 runs without a `local` profile.
# Other machines' profiles (`t4-paper`, `local`, a JSON file) come from the cost model.
BUILTIN: dict[str, Bandwidths] = {
    "h100-reference": Bandwidths("h100-reference", h2d_gbps=54.7, d2h_gbps=53.0, cpu_mem_gbps=71.0,
                              disk_read_gbps=1.2,
                              source="measured on the reference H100 machine: pinned "
                                     "host->GPU, device->host, host memcpy, disk read"),
}


def bandwidths_from_mapping(data: dict, name: str = "profile") -> Bandwidths:
    """Bandwidths from a dict with this class's field names (GB/s); unknown keys are an error."""
    known = {f.name for f in fields(Bandwidths)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown bandwidth keys {sorted(unknown)}; expected some of {sorted(known)}")
    return Bandwidths(**{"name": name, **data})


def from_cost_model_profile(prof) -> Bandwidths | None:
    """A cost-model HardwareProfile (bytes/s) as Bandwidths; None for a host-backed (GPU-less) one,
    where there is no PCIe to bound. The profile has no host-memory bandwidth: CPU attention's
    term uses `measurements["cpu_mem_bytes_s"]` when the profile carries it, else is left out."""
    if prof.host_backed_gpu:
        return None
    cpu_mem = (prof.measurements or {}).get("cpu_mem_bytes_s")
    return Bandwidths(name=prof.name, h2d_gbps=prof.cpu_to_gpu_bytes_s / GB,
                      d2h_gbps=prof.gpu_to_cpu_cache_bytes_s / GB,
                      cpu_mem_gbps=cpu_mem / GB if cpu_mem else None,
                      disk_read_gbps=prof.disk_to_cpu_bytes_s / GB,
                      disk_write_gbps=prof.cpu_to_disk_bytes_s / GB,
                      gpu_mem_gbps=prof.gpu_mem_bw_bytes_s / GB,
                      h2d_pageable_gbps=prof.cpu_to_gpu_pageable_bytes_s / GB,
                      source=f"cost-model profile {prof.name!r}: {prof.description}")


def load_bandwidths(name_or_path: str) -> Bandwidths | None:
    """`h100-reference`, a JSON file of `Bandwidths` fields, or any cost-model profile (`t4-paper`,
    `local`, a profile JSON file); None for a host-backed cost-model profile."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    from flexgen_repro.cost_model.hardware import load_profile
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        if "cpu_to_gpu_bytes_s" not in data:  # our own, smaller format
            data.setdefault("source", path)
            return bandwidths_from_mapping(data, data.pop("name", os.path.basename(path)))
    try:
        return from_cost_model_profile(load_profile(name_or_path))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"no bandwidth profile {name_or_path!r} ({e}); built in here: "
                         f"{sorted(BUILTIN)}") from None


@dataclass(frozen=True)
class Limit:
    """The decode-step bound: tokens/s, the binding term, each term's seconds per step."""
    throughput: float | None
    binding: str
    terms: dict[str, float]
    profile: str


def step_bytes(config: OptConfig, percent: tuple[float, ...], gpu_batch_size: int,
               num_gpu_batches: int, prompt_len: int, gen_len: int, cpu_cache_compute: bool = False,
               compress_weight: bool = False, compress_cache: bool = False,
               pin_weight: bool = True, staged: bool = False,
               page_cache: bool = False) -> dict[str, tuple[float, str]]:
    """Bytes moved per decode step, by term: {term: (bytes, bandwidth field)}. Unpinned host
    weights cross from pageable memory (`h2d_pageable_gbps`, where the profile measured it), or,
    `staged` (the runtime's pinned staging blocks, storage.copy_staged_), at the pinned rate after
    a host copy that reads and writes each byte (`cpu_mem_gbps`). Disk-resident weights are read
    into pinned buffers either way. `page_cache`: the disk tier's files were served by the page
    cache (mapped or buffered files that fit in memory), so their reads and writes are host
    memory copies (`cpu_mem_gbps`), not the drive's transfers."""
    db, layers = config.dtype_bytes, config.num_hidden_layers
    block = gpu_batch_size * num_gpu_batches
    w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu = (p / 100 for p in percent)
    w_disk, c_disk, a_disk = 1 - w_gpu - w_cpu, 1 - c_gpu - c_cpu, 1 - a_gpu - a_cpu
    weights = stored_bytes(config.model_bytes(), db, WEIGHT_COMP if compress_weight else None)
    cache_raw = config.cache_bytes(block, prompt_len + gen_len / 2)  # mean length over decode
    cache = stored_bytes(cache_raw, db, CACHE_COMP if compress_cache else None)
    new_kv = stored_bytes(config.cache_bytes(block, 1), db, CACHE_COMP if compress_cache else None)
    off_gpu_cache = (c_cpu + c_disk) * cache
    pinned_weights, unpinned = (w_cpu + w_disk) * weights, {}
    if not pin_weight and staged:
        unpinned = {"weights staged on the host": (2 * w_cpu * weights, "cpu_mem_gbps")}
    elif not pin_weight:  # host weights at the pageable rate, disk ones (read into pinned) not
        pinned_weights = w_disk * weights
        unpinned = {"unpinned weights over PCIe": (w_cpu * weights, "h2d_pageable_gbps")}
    src, read, write = (("the page cache", "cpu_mem_gbps", "cpu_mem_gbps") if page_cache else
                        ("disk", "disk_read_gbps", "disk_write_gbps"))
    terms = {
        "weights over PCIe": (pinned_weights, "h2d_gbps"),
        f"weights from {src}": (w_disk * weights, read),
        f"cache from {src}": (c_disk * cache, read),
        f"new cache to {src}": (c_disk * new_kv, write),
        "activations over PCIe": ((a_cpu + a_disk) * 2 * layers * config.hidden_bytes(block, 1),
                                  "h2d_gbps"),
        **unpinned,
    }
    if cpu_cache_compute:
        terms["cache read by CPU attention"] = (off_gpu_cache, "cpu_mem_gbps")
        gpu_cache_read = c_gpu * cache_raw
    else:
        terms["cache over PCIe"] = (off_gpu_cache, "h2d_gbps")
        terms["new cache to host"] = ((c_cpu + c_disk) * new_kv, "d2h_gbps")
        gpu_cache_read = cache_raw
    terms["GPU memory reads"] = (num_gpu_batches * config.model_bytes() + gpu_cache_read, "gpu_mem_gbps")
    return terms


# The resource each bandwidth field measures: pinned and pageable host->GPU copies share the link.
RESOURCE = {"h2d_pageable_gbps": "h2d_gbps"}


def decode_limit(terms: dict[str, tuple[float, str]], block: int, bw: Bandwidths) -> Limit:
    """Combine the per-step bytes with the bandwidths, adding the seconds of terms that share a
    resource; terms whose bandwidth is unknown are left out."""
    seconds, by_resource = {}, {}
    for term, (nbytes, rate) in terms.items():
        gbps = getattr(bw, rate)
        if rate == "h2d_pageable_gbps" and not gbps:  # not measured: the pinned rate bounds it
            gbps = bw.h2d_gbps
        if nbytes > 0 and gbps:
            seconds[term] = nbytes / (gbps * GB)
            by_resource.setdefault(RESOURCE.get(rate, rate), []).append(term)
    if not seconds:
        return Limit(None, "none (no transfer with a known bandwidth)", {}, bw.name)
    total = {res: sum(seconds[t] for t in names) for res, names in by_resource.items()}
    res = max(total, key=total.get)
    binding = " + ".join(sorted(by_resource[res], key=seconds.get, reverse=True))
    return Limit(block / total[res], binding, seconds, bw.name)


_COUNTS = re.compile(r"^\w+ [\d.]+ GiB(, \w+ [\d.]+ GiB)*$")   # DiskDevice.describe's byte counts


def served_from_page_cache(record: dict) -> bool:
    """Whether a run's disk tier was read through the page cache: the original FlexGen's always
    is (it reads its files through the page cache); ours when `disk_io_used` (flex_opt's record)
    counts no O_DIRECT bytes (`disk_io_bytes`, or the byte counts that end `disk_io_used`).
    Records without either count as read from the drive."""
    if record.get("runner") == "original":
        return True
    counts = record.get("disk_io_bytes")
    if counts is None:
        _, _, tail = str(record.get("disk_io_used") or "").rpartition("; ")
        if not _COUNTS.match(tail):
            return False
        counts = {part.split()[0]: part for part in tail.split(", ")}
    return bool(counts) and "direct" not in counts


def record_limit(record: dict, bw: Bandwidths) -> Limit:
    """The limit of a run record (flex_opt's or the baseline's JSON: model, percent, batches, ...)."""
    config = get_model_config(record["model"], dtype=record.get("dtype", "float16"))
    percent = parse_percent(str(record["percent"]).split())
    terms = step_bytes(config, percent, int(record["gpu_batch_size"]), int(record["num_gpu_batches"]),
                       int(record["prompt_len"]), int(record["gen_len"]),
                       bool(record.get("cpu_cache_compute")), bool(record.get("compress_weight")),
                       bool(record.get("compress_cache")), bool(record.get("pin_weight", True)),
                       bool(record.get("staged_weights", False)), served_from_page_cache(record))
    block = int(record["gpu_batch_size"]) * int(record["num_gpu_batches"])
    return decode_limit(terms, block, bw)


def resolve_bandwidths(hardware: dict, profile: str | None = None) -> Bandwidths | None:
    """The profile to bound this machine's cases with: the one named, else this machine's measured
    `local` profile (`invoke profile-hardware`) if it exists, else a built-in one for the same GPU
    (H100: the reference machine's figures; T4: the paper's), else None (no limit columns)."""
    if profile:
        return load_bandwidths(profile)
    try:
        return load_bandwidths("local")
    except ValueError:
        pass
    gpu = (hardware.get("gpu_name") or "").upper()
    if "H100" in gpu:
        return BUILTIN["h100-reference"]
    if "T4" in gpu.split():
        return load_bandwidths("t4-paper")
    return None
