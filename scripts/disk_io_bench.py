"""Micro-benchmark of the disk tier: bytes/s of its read paths in each I/O mode, and, optionally,
a flex_opt run per mode (decode tokens/s).

    python scripts/disk_io_bench.py --folder DIR [--mib 512] [--reps 5]
    python scripts/disk_io_bench.py --folder DIR --flex-opt "--model facebook/opt-125m --path _DUMMY_ ..."
    python scripts/disk_io_bench.py --folder DIR --cache-attention [--reps 5]

Reads are measured with the file in the page cache (a first read warms it), as a run that
re-reads its offload folder every token sees it. Prints one JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time

import torch

from flexgen_repro.devices.tiers import DiskDevice

MODES = ("direct", "buffered", "mmap")


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_rates(folder: str, mib: int, reps: int) -> list[dict]:
    """Per mode: a whole weight-like tensor read into host memory, and a cache-like file
    (rows, heads, seq, d) read for CPU attention as the runtime does (every position)."""
    out = []
    numel = (mib << 20) // 2
    values = torch.randn(numel).to(torch.float16)
    rows, heads, d = 8, 12, 64
    seq = max(1, numel // (rows * heads * d))
    for mode in MODES:
        disk = DiskDevice(folder, mode)
        whole = disk.put(values).data
        cache = disk.alloc((rows, heads, seq, d), torch.float16)
        cache.write(Ellipsis, values[:rows * heads * seq * d].view(rows, heads, seq, d))
        from flexgen_repro.devices.storage import PlainStore
        store = PlainStore(cache, seq_dim=2)
        nbytes = numel * 2
        t_whole = _best(lambda: whole.read(), reps)
        t_cache = _best(lambda: store.read_whole(torch.device("cpu")).sum(), reps)
        out.append(dict(mode=mode, what="read", mib=mib, whole_read_gb_s=nbytes / t_whole / 1e9,
                        cache_read_and_sum_gb_s=cache.nbytes / t_cache / 1e9))
        disk.close()
    return out


def cache_attention(folder: str, reps: int, rows: int = 16, heads: int = 32, seq: int = 544,
                    d: int = 64, written: int = 528) -> list[dict]:
    """Milliseconds per layer of a decode step's CPU attention over a disk-resident cache (an
    OPT-1.3B layer's keys and values: `rows` x `heads` x `seq` x `d` float16, `written`
    positions), in each mode: the cache read as the runtime reads it (PlainStore.read_whole)
    and attended by the C kernel, the step's new token then stored; and, beside it, the same
    over a host copy of the file (DiskFile.read). Also a prefill's store of the `written`
    positions into a fresh file as the runtime writes it (DiskFile.write), and, beside it, as a
    NumPy assignment into the same kind of mapping."""
    from flexgen_repro.devices.storage import PlainStore
    from flexgen_repro.kernels import cpu_attention
    from flexgen_repro.model.attention_math import decode_attention
    q = torch.randn(rows, heads, 1, d).to(torch.float16)
    new = torch.randn(rows, heads, 1, d).to(torch.float16)
    mask = torch.zeros(rows, seq + 1, dtype=torch.bool)
    mask[:, :written] = mask[:, -1] = True
    kernel = cpu_attention.decode_attention if cpu_attention.library() else \
        (lambda q, k, v, m, kn, vn, n_prev: decode_attention(q, k, v, m, 1.0, kn, vn, n_prev))
    out = []
    for mode in MODES:
        disk = DiskDevice(folder, mode)
        files = [disk.alloc((rows, heads, seq, d), torch.float16) for _ in range(2)]
        for f in files:
            f.write(Ellipsis, torch.randn(rows, heads, seq, d).to(torch.float16) * 0.1)
        stores = [PlainStore(f, seq_dim=2) for f in files]

        def step(read) -> None:
            k, v = (read(s) for s in stores)
            kernel(q, k, v, mask, new, new, n_prev=written)
            for s in stores:
                s.write(written, new)
        as_runtime = _best(lambda: step(lambda s: s.read_whole(torch.device("cpu"))), reps)
        copied = _best(lambda: step(lambda s: s.buf.read()), reps)
        prompt = torch.randn(rows, heads, written, d).to(torch.float16)

        def fresh_store(numpy: bool) -> float:
            f = disk.alloc((rows, heads, seq, d), torch.float16)
            t0 = time.perf_counter()
            if numpy:
                f.mapped()[:, :, :written] = prompt.numpy()
            else:
                f.write((slice(None), slice(None), slice(0, written)), prompt)
            spent = time.perf_counter() - t0
            disk.free(f)
            return spent
        store = min(fresh_store(False) for _ in range(reps))
        store_numpy = min(fresh_store(True) for _ in range(reps))
        out.append(dict(mode=mode, what="cache_attention", shape=[rows, heads, seq, d],
                        ms_per_layer=as_runtime * 1e3, ms_per_layer_over_a_copy=copied * 1e3,
                        prefill_store_ms=store * 1e3, prefill_store_ms_numpy=store_numpy * 1e3,
                        threads=torch.get_num_threads()))
        disk.close()
    return out


def flex_opt_rates(folder: str, flags: str) -> list[dict]:
    from flexgen_repro import flex_opt
    out = []
    for mode in MODES:
        args = flex_opt.build_parser().parse_args(
            shlex.split(flags) + ["--offload-dir", folder, "--disk-io", mode])
        rec = flex_opt.run(args)
        out.append(dict(mode=mode, what="flex_opt", flags=flags,
                        prefill_latency_s=rec.get("prefill_latency_s"),
                        decode_throughput=rec.get("decode_throughput")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True, help="an offload folder to measure in")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--flex-opt", default=None, help="flex_opt flags: run them once per mode")
    ap.add_argument("--cache-attention", action="store_true",
                    help="CPU attention over a disk-resident cache layer, per mode (ms per layer)")
    a = ap.parse_args()
    if a.flex_opt:
        rows = flex_opt_rates(a.folder, a.flex_opt)
    elif a.cache_attention:
        rows = cache_attention(a.folder, a.reps)
    else:
        rows = read_rates(a.folder, a.mib, a.reps)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
