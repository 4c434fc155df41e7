#!/usr/bin/env bash
# Final anchors at one commit: A, compressed 6.7B, D and C (warm-up now sizes and keeps the cache).
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
bench acd h100-anchors a-6.7b-gpu,6.7b-c-72,c-30b-paper 280
bench d h100-anchors d-30b-wcpu 150
