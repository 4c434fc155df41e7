#!/usr/bin/env bash
# Session 3, round 25 (same H100 as round 24): the HF Accelerate baselines, OPT-6.7B at batch 2 and
# OPT-30B at batch 8 under the 16 GiB cap (device_map offload), with round 24's profile.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/session3/hardware_local_r24_h100.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # cases timeout
  timeout $2 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-baselines', gpu_mem_gb=16.0, out='/tmp/res', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$1', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -1
  pkill -9 -f "flexgen_repro" ; sleep 2
}
bench hf-6.7b-b2 90
bench hf-30b-b8 470
tail -5 /tmp/res/h100-baselines/logs/hf-30b-b8.log 2>/dev/null
(cd /tmp && tar czf $O/res.tgz res)
