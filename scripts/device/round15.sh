#!/usr/bin/env bash
# Session 2, round 15: compute on its own stream (not the legacy default stream, which waits for
# the copy streams). Copy piece sizes probed; case C with one and two layers of weight prefetch;
# case D (link-bound: what the pieces cost).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/hardware_local_h200.json ~/.cache/flexgen_repro/hardware_local.json
timeout 90 python3 scripts/device/stream_probe.py sizes > $O/probe-sizes.json 2>&1; cat $O/probe-sizes.json
C_ARGS="--model opt-30b --path _DUMMY_ --offload-dir /tmp/offload --prompt-len 512 --gen-len 32
  --percent 8 92 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 --overlap true --sep-layer true
  --pin-weight true --cpu-cache-compute --gpu-mem-gb 16"
for pf in 1 2; do
  FLEXGEN_PREFETCH_LAYERS=$pf FLEXGEN_TRACE=$O/c-pf$pf-trace.json timeout ${TC:-170} python3 -m flexgen_repro.flex_opt $C_ARGS \
    --json-file $O/c-pf$pf.json > $O/c-pf$pf.txt 2>&1
  echo "C prefetch $pf rc $?"; grep -E "latency|throughput" $O/c-pf$pf.txt
done
bench() { # name suite cases timeout
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" > $O/$1.txt 2>&1
  grep -E "^\[|failed|skip" $O/$1.txt | tail -4
  (cd /tmp && tar czf $O/$1.tgz res-$1)
}
bench d h100-anchors d-30b-wcpu ${TD:-150}
