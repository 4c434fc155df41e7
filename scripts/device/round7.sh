#!/usr/bin/env bash
# Final round: case C with CPU attention over whole home buffers, calibration policies with CPU
# attention and 4-bit weights, and OPT-66B with 4-bit weights in host memory. Each bench call is
# tarred as soon as it ends, so whatever finished comes back.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/hardware_local_h200.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # name suite cases timeout
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" > $O/$1.txt 2>&1
  grep -E "^\[|failed|skip" $O/$1.txt | tail -4
  (cd /tmp && tar czf $O/$1.tgz res-$1)
}
bench c h100-anchors c-30b-paper 150
bench cal calibration cal-6.7b-wcpu-cpuattn-32x2,cal-30b-cw-cpuattn-32x1 200
bench large h100-large 66b-c-32x2 ${TL:-200}
