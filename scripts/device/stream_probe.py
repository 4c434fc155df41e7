"""Why do small copies on the compute stream wait for a weight copy on another thread's stream?
Probes: (1) are torch's pool streams blocking w.r.t. the legacy default stream; (2) latency of a
small H2D + kernel + D2H round trip on the main thread while a copy thread streams 2 GB of
registered pinned memory to the GPU (whole / in throttled pieces), with the main thread on the
default stream or on its own stream; (3) Python-level stalls of the main thread meanwhile (GIL)."""
import json
import statistics
import sys
import threading
import time

import torch

from flexgen_repro.devices.storage import copy_chunked_

out = {}
dev = torch.device("cuda")
side = torch.cuda.Stream()
torch.cuda.synchronize()
with torch.cuda.stream(side):
    torch.cuda._sleep(int(1.5e9))
t = time.perf_counter()
x = torch.ones(4, device=dev) + 1
torch.cuda.current_stream().synchronize()
out["default_stream_op_waits_for_pool_stream_s"] = time.perf_counter() - t
torch.cuda.synchronize()
mine = torch.cuda.Stream()
with torch.cuda.stream(side):
    torch.cuda._sleep(int(1.5e9))
t = time.perf_counter()
with torch.cuda.stream(mine):
    x = torch.ones(4, device=dev) + 1
    mine.synchronize()
out["pool_stream_op_waits_for_pool_stream_s"] = time.perf_counter() - t
torch.cuda.synchronize()

host = torch.empty(2 << 30, dtype=torch.uint8)
assert int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)) == 0
gpu = torch.empty_like(host, device=dev)
small = torch.ones(16 * 1024, dtype=torch.float16).pin_memory()


def copier(mode, done):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        t0 = time.perf_counter()
        if mode == "whole":
            gpu.copy_(host, non_blocking=True)
        else:
            copy_chunked_(gpu, host)
        s.synchronize()
        done.append(time.perf_counter() - t0)


def probe(mode, own_stream):
    done, lat, gaps = [], [], []
    th = threading.Thread(target=copier, args=(mode, done))
    ctx = torch.cuda.stream(torch.cuda.Stream()) if own_stream else torch.cuda.stream(torch.cuda.current_stream())
    with ctx:
        th.start()
        time.sleep(0.002)
        last = time.perf_counter()
        while th.is_alive():
            t = time.perf_counter()
            y = small.to(dev, non_blocking=True) * 2
            y.cpu()
            now = time.perf_counter()
            lat.append(now - t)
            gaps.append(t - last)
            last = now
        th.join()
    return dict(copy_s=done[0], gb_s=host.numel() / done[0] / 1e9, n=len(lat),
                lat_median_ms=1e3 * statistics.median(lat), lat_max_ms=1e3 * max(lat),
                gap_max_ms=1e3 * max(gaps))


from flexgen_repro.devices import storage  # noqa: E402

if len(sys.argv) > 1 and sys.argv[1] == "sizes":  # piece size x pieces in flight, own stream
    for mb, n in ((16, 2), (16, 4), (32, 2), (32, 3), (64, 2)):
        storage.COPY_CHUNK_BYTES, storage.COPY_IN_FLIGHT = mb << 20, n
        probe("pieces", True)
        out[f"pieces_{mb}MiB_x{n}"] = probe("pieces", True)
    out["whole"] = probe("whole", True)
else:
    for mode in ("whole", "pieces"):
        for own in (False, True):
            probe(mode, own)  # warm
            out[f"{mode}_{'own' if own else 'default'}_stream"] = probe(mode, own)
json.dump(out, sys.stdout, indent=1)
print()
