#!/usr/bin/env bash
# Session 5, round 38 (H100, `kind: nvidia-h100-x1`). Part a: the profile (now also the rate of the
# runtime's pieced copies, h2d_pieces), then OPT-66B with unpinned 4-bit weights (66b-c-32x2)
# through the pinned staging blocks and through the driver's pageable path
# (FLEXGEN_STAGE_PAGEABLE=0), side by side on one machine (round 37 ran them on two). Part b: the
# solver's OPT-30B pick with the refitted h100-lent (30b-solver-fit, predicted 49.3 tok/s before
# the run), and the staged OPT-66B case again under FLEXGEN_TRACE, to see where its step goes.
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
  a) bench 66b-staged h100-large 66b-c-32x2 190
     FLEXGEN_STAGE_PAGEABLE=0 bench 66b-driver h100-large 66b-c-32x2 360 ;;
  b) bench solver-fit h100-anchors 30b-solver-fit 140
     FLEXGEN_TRACE=/tmp/trace-66b.json bench 66b-staged-trace h100-large 66b-c-32x2 200
     gzip -c /tmp/trace-66b.json > $O/trace-66b-staged.json.gz 2>/dev/null ;;
esac
(cd /tmp && tar czf $O/res.tgz res-*)
