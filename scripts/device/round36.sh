#!/usr/bin/env bash
# Prepared in session 4, run in session 5 (part b also runs the Triton kernel GPU tests). On the
# H100 (`kind: nvidia-h100-x1`): the GPU tests at the final commit; the machine's profile first, so
# limits and figures come from one machine; C three times (is 35 tok/s machine spread or a
# first-run effect?), and once with the worker copying q/k/v itself; D; the solver's choice with the
# CPU-attention serialization term; the disk tier with buffered and O_DIRECT reads side by side.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${1:-a}" = a ]; then   # part b runs on the same warm machine: profile and tests once
timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
if [ -s $O/hardware_local.json ]; then cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
else cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json; fi
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_decode.py tests/test_runtime.py \
  tests/test_storage_copies.py > $O/tests.txt 2>&1
echo "tests rc $?"; tail -2 $O/tests.txt
fi
bench() { # tag suite cases timeout
  if [ $((SECONDS + $4)) -gt 590 ]; then echo "$1: skipped (time)"; return; fi
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" >> $O/bench.txt 2>&1
  echo "$1: $(grep -E '^\[|failed|skip' $O/bench.txt | tail -1)"
  pkill -9 -f "flexgen_repro[.]flex_[o]pt"; sleep 2
}
case "${1:-a}" in   # two calls on one warm machine: `round36.sh a`, then at once `round36.sh b`
  a) bench c1 h100-anchors c-30b-paper 140
     bench c2 h100-anchors c-30b-paper 110
     FLEXGEN_HOST_STAGE_INPUTS=worker bench c-worker h100-anchors c-30b-paper 110
     bench d h100-anchors d-30b-wcpu 90 ;;
  b) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py > $O/tests-kernels.txt 2>&1
     echo "kernel tests rc $?"; tail -n 2 $O/tests-kernels.txt
     bench c3 h100-anchors c-30b-paper 140
     bench solver-serial h100-anchors 30b-solver-serial 150
     bench disk-buffered h100-anchors 1.3b-wdisk-overlap-1x16 40
     FLEXGEN_DISK_DIRECT=1 bench disk-direct h100-anchors 1.3b-wdisk-overlap-1x16 40 ;;
esac
(cd /tmp && tar czf $O/res.tgz res-*)
