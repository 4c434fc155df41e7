#!/usr/bin/env bash
# Session 5, round 39 (H100, `kind: nvidia-h100-x1`), the last of the session. Part a: the anchors
# at the session's final code in one call (profile first; A, C, D, then OPT-66B with unpinned
# weights through the staging blocks). Part b: why staged OPT-66B's weight channel is busy the
# whole step (round 38's trace) while its copy measured 53 GB/s alone: OPT-66B again, then with
# OpenMP's threads sleeping instead of spinning when idle (OMP_WAIT_POLICY=PASSIVE: the staging
# copies and the cache stores run torch's CPU copies from two threads, two OpenMP teams), then
# with 64 MiB staging blocks instead of 16.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name --format=csv,noheader
if [ ! -s ~/.cache/flexgen_repro/hardware_local.json ]; then
  timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
    offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
  echo "profile rc $?"; grep -E '"h2d|cpu_mem_bytes_s' $O/hardware_local.json | head -8
  if [ -s $O/hardware_local.json ]; then cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
  else cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json; fi
fi
bench() { # tag suite cases timeout
  if [ $((SECONDS + $4)) -gt 595 ]; then echo "$1: skipped (time)"; return; fi
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" >> $O/bench.txt 2>&1
  echo "$1: $(grep -E '^\[|failed|skip' $O/bench.txt | tail -1)"
  pkill -9 -f "flexgen_repro[.]flex_[o]pt"; sleep 2
}
case "${1:-a}" in
  a) bench anchors h100-anchors a-6.7b-gpu,c-30b-paper,d-30b-wcpu 330
     bench 66b h100-large 66b-c-32x2 190 ;;
  b) bench 66b-again h100-large 66b-c-32x2 190
     OMP_WAIT_POLICY=PASSIVE bench 66b-passive h100-large 66b-c-32x2 190
     FLEXGEN_COPY_CHUNK_MB=64 bench 66b-chunk64 h100-large 66b-c-32x2 190 ;;
esac
(cd /tmp && tar czf $O/res.tgz res-*)
