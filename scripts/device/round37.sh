#!/usr/bin/env bash
# Session 5, round 37 (H100, `kind: nvidia-h100-x1`), two calls on one warm machine: `round37.sh a`
# then at once `round37.sh b`. Part a: the profile first (it measures the staged path: h2d_staged),
# the GPU tests of the copies and of the runtime with unpinned weights and whole weight copies;
# case D with whole weight copies (the default for its policy) and in 16 MiB pieces side by side;
# OPT-66B with 4-bit weights and cache in host memory, weights unpinned (66b-c-32x2), through the
# pinned staging blocks (storage.copy_staged_). Part b: the same OPT-66B case through the driver's
# pageable path (FLEXGEN_STAGE_PAGEABLE=0), and C with 32 MiB weight pieces against the default 16.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${1:-a}" = a ]; then
timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
echo "profile rc $?"; grep -E "h2d|cpu_mem" $O/hardware_local.json | head -8
if [ -s $O/hardware_local.json ]; then cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
else cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json; fi
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_storage_copies.py \
  tests/test_runtime.py -k "unpinned or staged or to_device or copy or whole" > $O/tests.txt 2>&1
echo "tests rc $?"; tail -n 2 $O/tests.txt
fi
[ -s ~/.cache/flexgen_repro/hardware_local.json ] ||
  cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # tag suite cases timeout
  if [ $((SECONDS + $4)) -gt 590 ]; then echo "$1: skipped (time)"; return; fi
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" >> $O/bench.txt 2>&1
  echo "$1: $(grep -E '^\[|failed|skip' $O/bench.txt | tail -1)"
  pkill -9 -f "flexgen_repro[.]flex_[o]pt"; sleep 2
}
case "${1:-a}" in
  a) FLEXGEN_WHOLE_WEIGHT_COPIES=0 bench d-pieces h100-anchors d-30b-wcpu 140
     bench d-whole h100-anchors d-30b-wcpu 100
     bench 66b-staged h100-large 66b-c-32x2 220 ;;
  b) FLEXGEN_STAGE_PAGEABLE=0 bench 66b-driver h100-large 66b-c-32x2 300
     bench c-16 h100-anchors c-30b-paper 130
     FLEXGEN_COPY_CHUNK_MB=32 bench c-32 h100-anchors c-30b-paper 130
     FLEXGEN_WHOLE_WEIGHT_COPIES=0 bench d-pieces2 h100-anchors d-30b-wcpu 100 ;;
esac
(cd /tmp && tar czf $O/res.tgz res-*)
