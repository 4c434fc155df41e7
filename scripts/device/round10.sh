#!/usr/bin/env bash
# Case C again with at most two cache stores in flight, and case D again (run-to-run spread).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/hardware_local_h200.json ~/.cache/flexgen_repro/hardware_local.json
timeout 250 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
  suite='h100-anchors', gpu_mem_gb=16.0, out='/tmp/res-cd', path='_DUMMY_', offload_dir='/tmp/offload',
  cases='c-30b-paper,d-30b-wcpu', profile='local'))" > $O/cd.txt 2>&1
grep -E "^\[|failed|skip" $O/cd.txt | tail -4
(cd /tmp && tar czf $O/cd.tgz res-cd)
