"""Benchmark the fused compression kernels against the pure-torch reference path on one GPU.

    python scripts/bench_kernels.py OUT.json [--sweep] [--quick] [--sweep-rows 16,32,48] [--sweep-only]

First checks every kernel against its reference at the benchmark's shapes (PASS/FAIL per kernel),
then times with triton.testing.do_bench (median; it flushes the L2 cache before each run) at
OPT-6.7B's shapes: hidden 4096, FFN 16384, decode batch 1..72, prefill 72 x 512 tokens, attention
over b=72, s=512..544, 32 heads, over the (b, s, hidden) cache and over the runtime's head-major
(b, 32, L, 128) cache (a view of a 544-position buffer, with and without a separate new token).
Achieved GB/s (bytes the kernel must move / time; for the head-major attention, compressed cache
bytes read / time) is reported beside a device-to-device copy measured here. Writes the raw
records as JSON; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexgen_repro import kernels  # noqa: E402
from flexgen_repro.compression import compress, decompress  # noqa: E402
from flexgen_repro.kernels import reference  # noqa: E402
from flexgen_repro.model.attention_math import decode_attention  # noqa: E402
from flexgen_repro.policy import CompressionConfig  # noqa: E402

DEVICE = "cuda"
HIDDEN, FFN, HEADS = 4096, 16384, 32
LINEARS = {"qkv/out (4096x4096)": (HIDDEN, HIDDEN), "fc1 (16384x4096)": (FFN, HIDDEN),
           "fc2 (4096x16384)": (HIDDEN, FFN)}
DECODE_BATCHES = (1, 8, 32, 72)
PREFILL_TOKENS = 72 * 512
ATTN_BATCH, ATTN_SEQS = 72, (512, 544)
HEAD_DIM, HEADS_CAP = HIDDEN // HEADS, 544  # head-major cache buffer: prompt 512 + 32 new tokens
# heads_decode_attention: fp16 kernel (float32 inside) against the fp16 runtime maths, which rounds
# scores and probabilities to fp16 (see tests/test_kernels_heads.py)
CHECK_TOL = {"dequant_linear": 2e-3, "decode_attention": 2e-3, "dequantize": 1e-3, "quantize": 1e-3,
             "heads_decode_attention": 4e-3}
WEIGHT_CFG, CACHE_CFG = CompressionConfig(4, 64, 0, False), CompressionConfig(4, 64, 2, False)
HEADS_CFG = CompressionConfig(4, 64, 3, False)  # the runtime's cache: groups along head_dim


def median_ms(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbps() -> float:
    """A 1 GiB device-to-device copy: bytes read + written per second."""
    src = torch.randn(1 << 28, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e6


def rel_err(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def rand(*shape, scale=1.0):
    return torch.randn(shape, device=DEVICE, dtype=torch.float16) * scale


def attn_inputs(seq: int):
    q = rand(ATTN_BATCH, HEADS, HIDDEN // HEADS)
    k = compress(rand(ATTN_BATCH, seq, HIDDEN), CACHE_CFG)
    v = compress(rand(ATTN_BATCH, seq, HIDDEN), CACHE_CFG)
    mask = torch.ones(ATTN_BATCH, seq, dtype=torch.bool, device=DEVICE)
    mask[::3, :17] = False  # some left padding
    return q, k, v, mask


def run_checks() -> dict:
    """Every kernel against its float32 reference at benchmark shapes."""
    checks = {}
    w = compress(rand(FFN, HIDDEN, scale=0.02), WEIGHT_CFG)
    for m in (1, 72, PREFILL_TOKENS // 64):
        x = rand(m, HIDDEN)
        checks[f"dequant_linear m={m}"] = ("dequant_linear", rel_err(
            kernels.dequant_linear(x, w), reference.dequant_linear(x, w)))
    q, k, v, mask = attn_inputs(ATTN_SEQS[-1])
    checks[f"decode_attention s={ATTN_SEQS[-1]}"] = ("decode_attention", rel_err(
        kernels.compressed_decode_attention(q, k, v, mask, 0.088),
        reference.decode_attention(q, k, v, mask, 0.088)))
    for new in (False, True):
        args = heads_inputs(ATTN_SEQS[-1] - new, new)
        checks[f"heads_decode_attention L={ATTN_SEQS[-1]}{' +new' if new else ''}"] = (
            "heads_decode_attention", rel_err(kernels.compressed_heads_decode_attention(*args),
                                              reference.heads_decode_attention(*args)))
    cache = rand(ATTN_BATCH, 64, HIDDEN)
    checks["dequantize cache"] = ("dequantize", rel_err(kernels.dequantize(k), decompress(k)))
    checks["quantize cache"] = ("quantize", rel_err(decompress(kernels.quantize(cache, CACHE_CFG)),
                                                    decompress(compress(cache, CACHE_CFG))))
    out = {}
    for name, (kind, err) in checks.items():
        ok = err < CHECK_TOL[kind]
        out[name] = {"pass": ok, "rel_err": err, "tol": CHECK_TOL[kind]}
        print(f"{'PASS' if ok else 'FAIL'}  {name:36s} rel_err={err:.2e} (tol {CHECK_TOL[kind]:.0e})")
    return out


def flexgen_style_linear(x, w, bias=None):
    """The original's path: decompress with torch ops, then an fp16 matmul."""
    return F.linear(x, decompress(w), bias)


def bench_linears(copy_gbps: float, quick: bool) -> list[dict]:
    rows = []
    for name, (n, k) in LINEARS.items():
        dense = rand(n, k, scale=0.02)
        w = compress(dense, WEIGHT_CFG)
        for m in (DECODE_BATCHES[:2] if quick else DECODE_BATCHES) + (PREFILL_TOKENS,):
            x = rand(m, k)
            moved = w.nbytes + x.numel() * 2 + m * n * 2
            impls = {"torch reference (decompress + fp16 matmul)": lambda: flexgen_style_linear(x, w),
                     "fused triton": lambda: kernels.dequant_linear(x, w),
                     "uncompressed fp16 matmul": lambda: F.linear(x, dense)}
            for impl, fn in impls.items():
                ms = median_ms(fn)
                nbytes = moved if impl != "uncompressed fp16 matmul" else dense.numel() * 2 + moved - w.nbytes
                rows.append(_row("dequant_linear", f"{name} m={m}", impl, ms, nbytes, copy_gbps,
                                 tflops=2 * m * n * k / ms / 1e9))
    return rows


def flexgen_style_attention(q, k, v, mask, scale):
    """The original's GPU path: decompress K and V, fp16 bmm, softmax, bmm."""
    b, heads, d = q.shape
    kd = decompress(k).view(b, -1, heads, d).permute(0, 2, 3, 1)
    vd = decompress(v).view(b, -1, heads, d).transpose(1, 2)
    att = torch.matmul(q.view(b, heads, 1, d), kd) * scale
    att = att.masked_fill(~mask[:, None, None, :], torch.finfo(att.dtype).min)
    return torch.matmul(torch.softmax(att, dim=-1), vd).view(b, heads, d)


def bench_attention(copy_gbps: float) -> list[dict]:
    rows = []
    for seq in ATTN_SEQS:
        q, k, v, mask = attn_inputs(seq)
        moved = k.nbytes + v.nbytes + 2 * q.numel() * 2 + mask.numel()
        impls = {"torch reference (decompress + fp16 attention)":
                 lambda: flexgen_style_attention(q, k, v, mask, 0.088),
                 "float32 reference (CPU fallback maths)":
                 lambda: reference.decode_attention(q, k, v, mask, 0.088),
                 "fused triton": lambda: kernels.compressed_decode_attention(q, k, v, mask, 0.088)}
        for impl, fn in impls.items():
            rows.append(_row("decode_attention", f"b={ATTN_BATCH} s={seq} heads={HEADS}", impl,
                             median_ms(fn), moved, copy_gbps))
    return rows


def heads_inputs(seq: int, new: bool):
    """OPT-6.7B decode over the head-major cache: q (b, 32, 1, 128) pre-scaled; K, V views of the
    first `seq` positions of a compressed (b, 32, 544, 128) buffer; a left-padded mask; and the
    new token's k, v when `new` (then the mask covers seq + 1 positions)."""
    shape = (ATTN_BATCH, HEADS, HEADS_CAP, HEAD_DIM)
    q = rand(ATTN_BATCH, HEADS, 1, HEAD_DIM, scale=HEAD_DIM ** -0.5)
    k, v = (compress(rand(*shape), HEADS_CFG).narrow(2, 0, seq) for _ in range(2))
    mask = torch.ones(ATTN_BATCH, seq + new, dtype=torch.bool, device=DEVICE)
    mask[::3, :17] = False  # some left padding
    kn, vn = (rand(ATTN_BATCH, HEADS, 1, HEAD_DIM) if new else None for _ in range(2))
    return q, k, v, mask, kn, vn


def bench_heads_attention(copy_gbps: float) -> list[dict]:
    """Decode attention over the head-major cache; GB/s = compressed K and V bytes read / time."""
    rows = []
    for seq, new in itertools.product(ATTN_SEQS, (False, True)):
        q, k, v, mask, kn, vn = heads_inputs(seq - new, new)
        dense_k, dense_v = decompress(k), decompress(v)
        impls = {"torch reference (decompress + runtime maths)":
                 lambda: reference.heads_decode_attention(q, k, v, mask, kn, vn),
                 "fused dequantize + runtime maths (old path)":
                 lambda: decode_attention(q, kernels.dequantize(k), kernels.dequantize(v), mask, 1.0, kn, vn),
                 "fused triton": lambda: kernels.compressed_heads_decode_attention(q, k, v, mask, kn, vn),
                 "uncompressed fp16 cache (runtime maths)":
                 lambda: decode_attention(q, dense_k, dense_v, mask, 1.0, kn, vn)}
        shape = f"b={ATTN_BATCH} L={seq}{' (+new)' if new else ''} heads={HEADS} d={HEAD_DIM}"
        for impl, fn in impls.items():
            nbytes = 2 * dense_k.numel() * 2 if impl.startswith("uncompressed") else k.nbytes + v.nbytes
            rows.append(_row("heads_attention", shape, impl, median_ms(fn), nbytes, copy_gbps))
    return rows


def bench_whole_tensor(copy_gbps: float) -> list[dict]:
    x = rand(ATTN_BATCH, 512, HIDDEN)
    packed = compress(x, CACHE_CFG)
    moved = x.numel() * 2 + packed.nbytes
    shape = f"cache {tuple(x.shape)}"
    return [_row("quantize", shape, "torch reference", median_ms(lambda: compress(x, CACHE_CFG)), moved, copy_gbps),
            _row("quantize", shape, "fused triton", median_ms(lambda: kernels.quantize(x, CACHE_CFG)), moved, copy_gbps),
            _row("dequantize", shape, "torch reference", median_ms(lambda: decompress(packed)), moved, copy_gbps),
            _row("dequantize", shape, "fused triton", median_ms(lambda: kernels.dequantize(packed)), moved, copy_gbps)]


def _row(kernel, shape, impl, ms, nbytes, copy_gbps, tflops=None) -> dict:
    gbps = nbytes / ms / 1e6
    row = {"kernel": kernel, "shape": shape, "impl": impl, "median_ms": ms, "bytes": nbytes,
           "gbps": gbps, "pct_of_copy_bw": 100 * gbps / copy_gbps}
    if tflops is not None:
        row["tflops"] = tflops
    print(f"{kernel:17s} {shape:36s} {impl:48s} {ms * 1e3:10.1f} us {gbps:8.0f} GB/s "
          f"{row['pct_of_copy_bw']:5.1f}%" + (f" {tflops:7.1f} TFLOP/s" if tflops else ""), flush=True)
    return row


def _try_time(fn) -> float:
    try:
        return median_ms(fn)
    except Exception as err:  # a config that does not compile or fit (out of resources)
        print(f"  skipped: {type(err).__name__}: {str(err)[:120]}")
        return float("nan")


def sweep(copy_gbps: float, sweep_rows=(1, 32, 72), linears_only: bool = False) -> list[dict]:
    """Block sizes (rows of x too), warps and split-K of the fused kernels, for updating their
    defaults: the decode matmul at `sweep_rows` rows of x, then (unless `linears_only`) the
    attention kernels."""
    from flexgen_repro.kernels import compressed_attention, dequant_matmul
    rows = []
    for name, (n, k) in LINEARS.items():
        w = compress(rand(n, k, scale=0.02), WEIGHT_CFG)
        for m in sweep_rows:
            x = rand(m, k)
            block_ms = (16,) if m <= 16 else (16, 32, 64)  # rows of x per program
            for bm, out, bk, warps, split in itertools.product(block_ms, (32, 64), (64, 128), (4, 8),
                                                               (1, 2, 4, 8)):
                cfg = {"BLOCK_M": bm, "BLOCK_OUT": out, "BLOCK_K": bk, "num_warps": warps, "split": split}
                ms = _try_time(lambda: dequant_matmul.dequant_linear(x, w, None, cfg))
                rows.append({**_row("sweep", f"{name} m={m}", json.dumps(cfg), ms,
                                    w.nbytes + (m * k + m * n) * 2, copy_gbps), "config": cfg})
    if linears_only:
        return rows
    q, kc, vc, mask = attn_inputs(ATTN_SEQS[0])
    for block_s, warps in itertools.product((16, 32, 64), (4, 8)):
        cfg = {"block_s": block_s, "num_warps": warps}
        ms = _try_time(lambda: compressed_attention.decode_attention(q, kc, vc, mask, 0.088, **cfg))
        rows.append({**_row("sweep", f"attention s={ATTN_SEQS[0]}", json.dumps(cfg), ms,
                            kc.nbytes + vc.nbytes, copy_gbps), "config": cfg})
    return rows + sweep_heads(copy_gbps)


def sweep_heads(copy_gbps: float) -> list[dict]:
    """Positions per step and warps of the head-major decode kernel (defaults in heads_attention)."""
    from flexgen_repro.kernels import heads_attention
    rows = []
    for new in (False, True):
        q, k, v, mask, kn, vn = heads_inputs(ATTN_SEQS[-1] - new, new)
        for block_l, warps in itertools.product((16, 32, 64), (2, 4, 8)):
            cfg = {"block_l": block_l, "num_warps": warps}
            ms = _try_time(lambda: heads_attention.decode_attention(q, k, v, mask, kn, vn, **cfg))
            rows.append({**_row("sweep", f"heads attention L={ATTN_SEQS[-1]}{' +new' if new else ''}",
                                json.dumps(cfg), ms, k.nbytes + v.nbytes, copy_gbps), "config": cfg})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="where the JSON records are written")
    ap.add_argument("--sweep", action="store_true", help="also sweep the decode kernels' block sizes")
    ap.add_argument("--quick", action="store_true", help="fewer decode batch sizes")
    ap.add_argument("--sweep-rows", default="1,32,72",
                    help="rows of x the decode matmul sweep times (comma-separated; implies --sweep)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="after the checks, only the decode matmul sweep (implies --sweep)")
    args = ap.parse_args(argv)
    try:
        sweep_rows = tuple(int(r) for r in args.sweep_rows.split(","))
    except ValueError:
        print(f"error: --sweep-rows takes whole numbers separated by commas, got {args.sweep_rows!r}",
              file=sys.stderr)
        return 2
    if any(r < 1 for r in sweep_rows):
        print("error: --sweep-rows must be >= 1", file=sys.stderr)
        return 2
    if args.sweep_only or args.sweep_rows != ap.get_default("sweep_rows"):
        args.sweep = True
    if not kernels.available():
        print("bench_kernels needs a CUDA GPU and triton; run it on the GPU machine", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    checks = run_checks()
    copy_gbps = copy_bandwidth_gbps()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    rows = [] if args.sweep_only else (bench_linears(copy_gbps, args.quick) + bench_attention(copy_gbps)
                                       + bench_heads_attention(copy_gbps) + bench_whole_tensor(copy_gbps))
    if args.sweep:
        rows += sweep(copy_gbps, sweep_rows, linears_only=args.sweep_only)
    import triton
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
              "commit": commit or "unknown", "measured": True, "copy_bandwidth_gbps": copy_gbps,
              "checks": checks, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(c["pass"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
