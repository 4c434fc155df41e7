#!/usr/bin/env bash
# Session 2, round 14: case C traced with at most two 16 MiB copy pieces queued per copy thread,
# CPU attention on a worker (deferred finish); then C without the worker and C with one layer of
# weight prefetch (before/after of each), and case D.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/hardware_local_h200.json ~/.cache/flexgen_repro/hardware_local.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $O/gpu.txt 2>&1
C_ARGS="--model opt-30b --path _DUMMY_ --offload-dir /tmp/offload --prompt-len 512 --gen-len 32
  --percent 8 92 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 --overlap true --sep-layer true
  --pin-weight true --cpu-cache-compute --gpu-mem-gb 16"
FLEXGEN_TRACE=$O/c-trace.json timeout ${TC:-250} python3 -m flexgen_repro.flex_opt $C_ARGS \
  --json-file $O/c.json > $O/c.txt 2>&1
echo "C rc $?"; grep -E "latency|throughput|trace|Error|error" $O/c.txt | cut -c1-700
bench() { # name suite cases timeout
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" > $O/$1.txt 2>&1
  grep -E "^\[|failed|skip" $O/$1.txt | tail -4
  (cd /tmp && tar czf $O/$1.tgz res-$1)
}
FLEXGEN_CPU_ATTN_WORKER=0 timeout ${TC:-250} python3 -m flexgen_repro.flex_opt $C_ARGS \
  --json-file $O/c-noworker.json > $O/c-noworker.txt 2>&1
echo "C no worker rc $?"; grep -E "latency|throughput|Error|error" $O/c-noworker.txt
FLEXGEN_PREFETCH_LAYERS=1 timeout ${TC:-250} python3 -m flexgen_repro.flex_opt $C_ARGS \
  --json-file $O/c-prefetch1.json > $O/c-prefetch1.txt 2>&1
echo "C prefetch 1 rc $?"; grep -E "latency|throughput|Error|error" $O/c-prefetch1.txt
