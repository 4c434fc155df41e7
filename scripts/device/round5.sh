#!/usr/bin/env bash
# Diagnostic round: how long pinning host memory takes (cudaHostRegister vs torch's pinned
# allocator), then case C and the cost model's OPT-30B policy through flex_opt with progress lines.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p $O /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/hardware_local_h200.json ~/.cache/flexgen_repro/hardware_local.json
python3 - <<'PY' 2>&1 | tee $O/pin.txt
import time, torch
n = 4 << 30
t = time.perf_counter(); a = torch.empty(n, dtype=torch.uint8)
rc = int(torch.cuda.cudart().cudaHostRegister(a.data_ptr(), n, 0)); t1 = time.perf_counter() - t
t = time.perf_counter(); b = torch.empty(n, dtype=torch.uint8, pin_memory=True); t2 = time.perf_counter() - t
g = torch.empty(n, dtype=torch.uint8, device="cuda")
for name, src in (("registered", a), ("pinned", b)):
    g.copy_(src, non_blocking=True); torch.cuda.synchronize(); t = time.perf_counter()
    g.copy_(src, non_blocking=True); torch.cuda.synchronize()
    print(f"{name}: h2d {n / (time.perf_counter() - t) / 1e9:.1f} GB/s")
print(f"4 GiB: cudaHostRegister rc={rc} {t1:.2f} s; torch pinned alloc {t2:.2f} s")
PY
C="--model opt-30b --path _DUMMY_ --offload-dir /tmp/offload --prompt-len 512 --gen-len 32 --gpu-mem-gb 16 --log-file ''"
eval timeout ${TC:-270} python3 -m flexgen_repro.flex_opt $C --percent 8 92 0 100 0 100 --gpu-batch-size 16 \
  --num-gpu-batches 3 --cpu-cache-compute --json-file $O/c-30b-paper.json 2>&1 | tee $O/c.log | grep -v Warn
eval timeout ${TA:-250} python3 -m flexgen_repro.flex_opt $C --percent auto --json-file $O/30b-auto.json 2>&1 | tee $O/auto.log | grep -v Warn
