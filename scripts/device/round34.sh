#!/usr/bin/env bash
# Session 4, round 34 (H100): the anchors at one commit with the final defaults (fused resident
# decode, q/k/v fused, pipelined graph decode; CPU attention's result through pinned memory behind
# the link gate; copy threads polling every 100 us). C's before (session 3's copies: synchronous,
# blocking waits) and after side by side, then A, D, the solver's OPT-30B choice, compressed 6.7B.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name --format=csv,noheader
cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # tag suite cases timeout
  if [ $((SECONDS + $4)) -gt 590 ]; then echo "$1: skipped (time)"; return; fi
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" >> $O/bench.txt 2>&1
  echo "$1: $(grep -E '^\[|failed|skip' $O/bench.txt | tail -1)"
  pkill -9 -f flexgen_repro.flex_opt; sleep 2
}
bench c h100-anchors c-30b-paper 140
FLEXGEN_HOST_STAGE=0 FLEXGEN_COPY_POLL_US=0 bench c-before h100-anchors c-30b-paper 120
bench d h100-anchors d-30b-wcpu 90
bench a h100-anchors a-6.7b-gpu 45
bench auto h100-anchors 30b-auto 130
bench c72 h100-anchors 6.7b-c-72 45
(cd /tmp && tar czf $O/res.tgz res-*)
