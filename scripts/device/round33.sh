#!/usr/bin/env bash
# Session 4, round 33 (H100). Round 32's trace of C (staged + gate): the pinned device->host copies
# of q/k/v on the compute stream waited ~14 ms for the weight stream's host->device copy, while
# round 28's pageable ones had not. Now the hybrid (inputs pageable and synchronous as before, the
# result pinned + asynchronous behind the link gate), side by side with the synchronous path and
# with copy threads polling instead of blocking; then A and our 4-bit counterpart of DeepSpeed's.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name --format=csv,noheader
cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # tag suite cases timeout
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" >> $O/bench.txt 2>&1
  echo "$1: $(grep -E '^\[|failed|skip' $O/bench.txt | tail -1)"
  pkill -9 -f flexgen_repro.flex_opt; sleep 2
}
FLEXGEN_HOST_STAGE=0 bench c-sync h100-anchors c-30b-paper 125
FLEXGEN_HOST_STAGE=1 bench c-hybrid h100-anchors c-30b-paper 125
FLEXGEN_HOST_STAGE=1 FLEXGEN_COPY_POLL_US=100 bench c-hybrid-poll h100-anchors c-30b-paper 125
bench a h100-anchors a-6.7b-gpu 60
bench fg4 h100-baselines fg-30b-4bit-b8 100
(cd /tmp && tar czf $O/res.tgz res-*)
