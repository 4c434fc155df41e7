#!/usr/bin/env bash
# Session 3, round 26 (H100): the HF Accelerate OPT-30B baseline again. Round 25's load ran out of
# the 16 GiB cap: accelerate's device_map put more weights on the GPU than its budget, and loading
# fragmented the allocator. The map is now cut to the budget and the allocator uses expandable segments.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name --format=csv,noheader
cp results/device-runs/session3/hardware_local_r24_h100.json ~/.cache/flexgen_repro/hardware_local.json
timeout 560 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
  suite='h100-baselines', gpu_mem_gb=16.0, out='/tmp/res', path='_DUMMY_', offload_dir='/tmp/offload',
  cases='hf-30b-b8', profile='local'))" > $O/bench.txt 2>&1
grep -E "^\[|failed|skip" $O/bench.txt; tail -4 /tmp/res/h100-baselines/logs/hf-30b-b8.log
(cd /tmp && tar czf $O/res.tgz res)
