"""Measuring a run: peak GPU and CPU memory of the measured generation, throughput figures, the
original's log text and one JSON record. Every figure covers the whole generation."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass

import psutil
import torch

from flexgen_repro.devices.copy_engine import poll_count

GB = 1 << 30


# The CUDA caching allocator's counters a run records (torch.cuda.memory_stats): retries after a
# failed allocation (cached blocks freed, the device synchronized), whole-device synchronizations,
# and segments taken from / given back to the driver.
ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc",
                      "num_device_free")


def _allocator_counters() -> dict | None:
    if not torch.cuda.is_available():
        return None
    stats = torch.cuda.memory_stats()
    return {key: int(stats.get(key, 0)) for key in ALLOCATOR_COUNTERS}


class PeakMemory:
    """Peak GPU memory (allocator) and peak process RSS while the `with` block runs; also what
    happened in between that costs the host time: the allocator's counters (`allocator_events`,
    None without CUDA) and the copy threads' polling sleeps (`copy_polls`)."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.gpu_peak_bytes = 0
        self.cpu_peak_bytes = 0
        self.allocator_events: dict | None = None
        self.copy_polls = 0
        self._stop = threading.Event()
        self._thread = None
        self._start: tuple = (None, 0)

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = (_allocator_counters(), poll_count())
        self.cpu_peak_bytes = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self.cpu_peak_bytes = max(self.cpu_peak_bytes, proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_peak_bytes = max(self.cpu_peak_bytes, psutil.Process().memory_info().rss)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.gpu_peak_bytes = torch.cuda.max_memory_allocated()
        before, polls = self._start
        after = _allocator_counters()
        if before is not None and after is not None:
            self.allocator_events = {key: after[key] - before[key] for key in ALLOCATOR_COUNTERS}
        self.copy_polls = poll_count() - polls


@dataclass
class RunMetrics:
    num_prompts: int
    prompt_len: int
    gen_len: int
    prefill_latency_s: float
    decode_latency_s: float
    peak_gpu_mem_gb: float
    peak_cpu_mem_gb: float

    @property
    def prefill_throughput(self) -> float:
        """Prompt tokens processed per second of prefill."""
        if not self.prefill_latency_s:
            return 0.0
        return self.num_prompts * self.prompt_len / self.prefill_latency_s

    @property
    def decode_throughput(self) -> float:
        """Tokens generated after the first, per second of decoding."""
        if self.gen_len <= 1 or not self.decode_latency_s:
            return 0.0
        return self.num_prompts * (self.gen_len - 1) / self.decode_latency_s

    @property
    def total_latency_s(self) -> float:
        return self.prefill_latency_s + self.decode_latency_s

    @property
    def total_throughput(self) -> float:
        """Generated tokens / (prefill + decode time)."""
        return self.num_prompts * self.gen_len / self.total_latency_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(decode_throughput=self.decode_throughput, total_latency_s=self.total_latency_s,
                 total_throughput=self.total_throughput)
        return d


def log_text(m: RunMetrics, model_size: int, cache_size: int, hidden_size: int) -> str:
    """The original FlexGen benchmark log, with `projected: False` (nothing here is projected)."""
    return (f"model size: {model_size / GB:.3f} GB\tcache size: {cache_size / GB:.3f} GB\t"
            f"hidden size (p): {hidden_size / GB:.3f} GB\n"
            f"peak gpu mem: {m.peak_gpu_mem_gb:.3f} GB\tprojected: False\n"
            f"prefill latency: {m.prefill_latency_s:.3f} s\t"
            f"prefill throughput: {m.prefill_throughput:.3f} token/s\n"
            f"decode latency: {m.decode_latency_s:.3f} s\t"
            f"decode throughput: {m.decode_throughput:.3f} token/s\n"
            f"total latency: {m.total_latency_s:.3f} s\t"
            f"total throughput: {m.total_throughput:.3f} token/s")


def write_record(path: str, record: dict) -> None:
    """Write one JSON record atomically (a partial file never appears)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_outputs(record: dict, header: str, log_file: str | None, json_file: str | None) -> None:
    """Append `header` and the record's log text to `log_file`; write the JSON record."""
    if log_file:
        with open(log_file, "a") as f:
            f.write(f"{header}\n{record['log_text']}\n")
    if json_file:
        write_record(json_file, record)
