#!/usr/bin/env bash
# Session 3, round 27 (H100): OPT-175B, 4-bit weights (80% in host memory, unpinned; 20% on disk)
# and 4-bit cache in host memory, 16x2, prompt 512, 16 generated tokens (h100-large
# 175b-c-16x2-gen16: a 32-token run does not fit the 10-minute command limit). Round 24's profile.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name --format=csv,noheader; free -g | head -2; df -h /tmp | tail -1
cp results/device-runs/session3/hardware_local_r24_h100.json ~/.cache/flexgen_repro/hardware_local.json
timeout 570 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
  suite='h100-large', gpu_mem_gb=16.0, out='/tmp/res', path='_DUMMY_', offload_dir='/tmp/offload',
  cases='175b-c-16x2-gen16', profile='local'))" > $O/bench.txt 2>&1
grep -E "^\[|failed|skip" $O/bench.txt; tail -8 /tmp/res/h100-large/logs/175b-c-16x2-gen16.log
(cd /tmp && tar czf $O/res.tgz res)
