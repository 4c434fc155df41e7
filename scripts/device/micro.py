"""Micro-measurements on the GPU machine: host<->GPU bandwidth (pinned, pageable) and CPU decode
attention rates by dtype. Prints one JSON object."""
import json
import os
import time

import torch


def bw(src, dst, reps=5):
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return src.numel() * src.element_size() * reps / (time.perf_counter() - t) / 1e9


def cpu_attn(dtype, b=16, heads=56, L=544, d=128, reps=3):
    k = torch.randn(b * heads, L, d).to(dtype)
    v = torch.randn(b * heads, L, d).to(dtype)
    q = torch.randn(b * heads, 1, d).to(dtype)
    out = {}
    for name, fn in {
        "bmm": lambda: torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)).float(), -1).to(dtype), v),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }.items():
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = (time.perf_counter() - t) / reps
        out[name] = {"ms": dt * 1e3, "GB/s": 2 * k.numel() * k.element_size() / dt / 1e9}
    return out


def main():
    res = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        n = 1 << 28  # 512 MiB fp16
        g = torch.empty(n, dtype=torch.float16, device="cuda")
        pinned = torch.empty(n, dtype=torch.float16).pin_memory()
        pageable = torch.empty(n, dtype=torch.float16)
        res["h2d_pinned_GBps"] = bw(pinned, g)
        res["d2h_pinned_GBps"] = bw(g, pinned)
        res["h2d_pageable_GBps"] = bw(pageable, g, 2)
        res["d2h_pageable_GBps"] = bw(g, pageable, 2)
        h = torch.empty(n, dtype=torch.float16)
        t = time.perf_counter()
        for _ in range(3):
            h.copy_(pageable)
        res["host_memcpy_GBps"] = 3 * 2 * n / (time.perf_counter() - t) / 1e9
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        res[f"cpu_attn_{str(dt)[6:]}"] = cpu_attn(dt)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
