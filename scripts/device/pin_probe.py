"""Host->GPU copy rate from three kinds of pinned host memory, same sizes, one stream:
torch's pinned allocator (cudaHostAlloc), an ordinary allocation registered with cudaHostRegister
(what MemDevice does for long-lived buffers), and the same after madvise(MADV_HUGEPAGE)."""
import ctypes
import json
import mmap
import sys
import time

import torch

libc = ctypes.CDLL("libc.so.6", use_errno=True)
MADV_HUGEPAGE = 14


def registered(nbytes, huge):
    t = torch.empty(nbytes, dtype=torch.uint8)
    if huge:
        page = mmap.PAGESIZE
        start = t.data_ptr() // page * page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(nbytes + t.data_ptr() - start), MADV_HUGEPAGE)
    t.fill_(1)  # fault the pages in (after the advice)
    assert int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)) == 0
    return t


def rate(src, dst, reps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return src.numel() * reps / (time.perf_counter() - start) / 1e9


def main():
    out = {"thp": open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()}
    for mb in (400, 1700):  # about one OPT-30B fc weight, and a whole layer
        n = mb << 20
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        srcs = {"alloc": torch.empty(n, dtype=torch.uint8, pin_memory=True),
                "register": registered(n, False), "register_thp": registered(n, True)}
        for name, src in srcs.items():
            rate(src, dst, 2)
            out[f"{name}_{mb}MB"] = round(max(rate(src, dst, 8) for _ in range(3)), 2)
        for name in ("register", "register_thp"):
            torch.cuda.cudart().cudaHostUnregister(srcs[name].data_ptr())
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
