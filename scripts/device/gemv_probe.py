"""Decode linears at batch 2 (OPT-6.7B's shapes, fp16): cuBLAS (F.linear) against the Triton
small_linear kernel, each replayed 200 times in a CUDA graph; GB/s of weight bytes read, and the
largest difference from a float64 reference. Usage: python3 gemv_probe.py OUT.json"""
import json
import sys

import torch
import torch.nn.functional as F

from flexgen_repro.kernels import small_linear

SHAPES = [(4096, 4096), (12288, 4096), (16384, 4096), (4096, 16384), (50272, 4096)]


def timed(fn, reps=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


out = []
for m in (1, 2, 8):
    for n, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        b = torch.randn(n, device="cuda", dtype=torch.float16) * 0.1
        ref = x.double() @ w.double().T + b.double()
        small_linear.linear(x, w, b)  # autotune outside the graph
        row = dict(m=m, n=n, k=k, bytes=n * k * 2)
        for name, fn in (("cublas", lambda: F.linear(x, w, b)), ("triton", lambda: small_linear.linear(x, w, b))):
            t = timed(fn)
            err = (fn().double() - ref).abs().max().item()
            row[name] = dict(us=t * 1e6, gbs=n * k * 2 / t / 1e9, max_err=err)
        row["triton_config"] = str(small_linear._kernel.best_config)
        print(json.dumps(row), flush=True)
        out.append(row)
json.dump(out, open(sys.argv[1], "w"), indent=1)
