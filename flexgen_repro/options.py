"""RuntimeOptions: how the runtime runs a policy, apart from where things go (that is `Policy`).

One frozen object, built by keyword and validated where it is built, passed to `ExecutionEnv`
and `OptLM` (and exposed as command-line flags). Nothing here is read from the environment:
the few settings that must come from there are listed in `flexgen_repro.envs`.
"""
from __future__ import annotations

from dataclasses import dataclass

DISK_IO_MODES = ("auto", "direct", "buffered", "mmap")


@dataclass(frozen=True)
class RuntimeOptions:
    """Runtime settings. Defaults are what the benchmarks run with.

    - cuda_graphs: all-GPU policies, and those that stream only weights from pinned host memory,
      decode through captured CUDA graphs (CUDA only).
    - disk_io: how the disk tier reads and writes its files. "direct": O_DIRECT into aligned
      buffers, several requests in flight; "buffered": through the page cache; "mmap": reads
      map the file; "auto": on a drive whose filesystem accepts O_DIRECT, files are mapped while
      they fit in half the available memory (the page cache serves them at memory speed) and
      read with O_DIRECT beyond; elsewhere mmap.
    - cpu_attention_kernel: decode attention on the CPU through the C kernel (built at first use;
      torch where no compiler exists).
    - cpu_attention_threads: threads of that kernel (None: torch's thread count less a reserve).
    - profile: print, per token, where the time of each kind of layer went (synchronizes the GPU
      after every layer, so it slows overlapped runs).
    - trace_path: write a Chrome trace of the measured generation to this file.
    """
    cuda_graphs: bool = True
    disk_io: str = "auto"
    cpu_attention_kernel: bool = True
    cpu_attention_threads: int | None = None
    profile: bool = False
    trace_path: str | None = None

    def __post_init__(self):
        if self.disk_io not in DISK_IO_MODES:
            raise ValueError(f"RuntimeOptions.disk_io must be one of {DISK_IO_MODES}, got {self.disk_io!r}")
        if self.cpu_attention_threads is not None and int(self.cpu_attention_threads) < 1:
            raise ValueError("RuntimeOptions.cpu_attention_threads must be >= 1 or None, got "
                             f"{self.cpu_attention_threads}")
