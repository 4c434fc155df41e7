"""CPU decode attention at case C's shape (OPT-30B, GPU batch 16, 56 heads, 544-position buffer,
528 written, float16): torch's path against kernels/cpu_attention.c at several team sizes, each
alone and while a copy thread streams pinned host memory to the GPU (as the weight stream does),
each timed over at least 1.5 s once the stream runs.
Prints and writes JSON: ms per call, the cache bytes read per second, the stream's rate meanwhile.

    python scripts/device/cpu_attn_probe.py OUT.json
"""
import json
import os
import sys
import threading
import time

import torch

from flexgen_repro.kernels import cpu_attention
from flexgen_repro.model.attention_math import decode_attention

B, H, L, D, VALID = 16, 56, 544, 128, 528


def system() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    nodes = [n for n in os.listdir("/sys/devices/system/node") if n.startswith("node")] \
        if os.path.isdir("/sys/devices/system/node") else []
    return {"cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "numa_nodes": len(nodes), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


class Stream:
    """A thread copying 2 GiB of pinned host memory to the GPU over and over, in 64 MiB pieces as
    the runtime copies; `bytes` counts finished pieces. Entering waits until it streams."""
    PIECE = 64 << 20

    def __init__(self):
        self.host = torch.empty(2 << 30, dtype=torch.uint8).pin_memory()
        self.dev = torch.empty_like(self.host, device="cuda")
        self.stop, self.started, self.bytes = threading.Event(), threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            while not self.stop.is_set():
                for i in range(0, self.host.numel(), self.PIECE):
                    self.dev[i:i + self.PIECE].copy_(self.host[i:i + self.PIECE], non_blocking=True)
                    s.synchronize()
                    self.bytes += self.PIECE
                    self.started.set()

    def __enter__(self):
        self.thread.start()
        self.started.wait(30)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def timed(fn, stream=None, seconds=1.5) -> tuple[float, float]:
    """(seconds per call over >= `seconds` of calls after a warm-up, the stream's GB/s meanwhile)."""
    fn()
    n, t, b0 = 0, time.perf_counter(), stream.bytes if stream else 0
    while time.perf_counter() - t < seconds or n < 3:
        fn()
        n += 1
    wall = time.perf_counter() - t
    return wall / n, ((stream.bytes - b0) / wall / 1e9 if stream else 0.0)


def main(out_path: str) -> None:
    res = {"system": system(), "shape": [B, H, L, D, VALID]}
    t = time.perf_counter()
    lib = cpu_attention.library()
    res["build_s"] = time.perf_counter() - t
    print(res, flush=True)
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(B, H, 1, D, generator=g) * 0.1).half()
    k, v = (torch.randn(B, H, L, D, generator=g).half() for _ in range(2))
    kn, vn = (torch.randn(B, H, 1, D, generator=g).half() for _ in range(2))
    mask = torch.ones(B, L + 1, dtype=torch.bool)
    mask[:, VALID:L] = False
    read = 2 * B * H * VALID * D * 2
    variants = {"torch": lambda: decode_attention(q, k, v, mask, 1.0, kn, vn, VALID)}
    if lib is not None:
        ref = decode_attention(q.double(), k.double(), v.double(), mask, 1.0, kn.double(), vn.double(), VALID)
        got = cpu_attention.decode_attention(q, k, v, mask, kn, vn, VALID)
        res["kernel_max_abs_err_vs_float64"] = (got.double() - ref).abs().max().item()
        res["torch_max_abs_err_vs_float64"] = (variants["torch"]().double() - ref).abs().max().item()
        for n in (4, 8, 12, 14, 16):
            variants[f"kernel_t{n}"] = (lambda n=n: (os.environ.__setitem__("FLEXGEN_CPU_ATTN_THREADS", str(n)),
                                                     cpu_attention.decode_attention(q, k, v, mask, kn, vn, VALID)))
    rows = []
    for name, fn in variants.items():
        alone = timed(fn)[0]
        row = {"variant": name, "alone_ms": alone * 1e3, "alone_gbps": read / alone / 1e9}
        if torch.cuda.is_available():
            with Stream() as s:
                busy, link = timed(fn, s)
            row.update(busy_ms=busy * 1e3, busy_gbps=read / busy / 1e9, stream_gbps=link)
        rows.append(row)
        print(row, flush=True)
    if torch.cuda.is_available():
        with Stream() as s:
            res["stream_alone_gbps"] = timed(lambda: time.sleep(0.05), s)[1]
    res["rows"] = rows
    os.environ.pop("FLEXGEN_CPU_ATTN_THREADS", None)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))


if __name__ == "__main__":
    main(sys.argv[1])
