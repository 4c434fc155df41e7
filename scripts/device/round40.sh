#!/usr/bin/env bash
# Session 6, round 40 (H100, `kind: nvidia-h100-x1`, carry .whl from fetch_original_wheel.sh): the
# original FlexGen itself (PyPI flexgen 0.1.8 through bench/original.py) beside ours, on one
# machine. Part a: install, a short smoke run of the original (stop if it fails), the profile,
# then A and D, ours and the original's. Part b: C, ours and the original's. Part c: OPT-66B with
# 4-bit weights and cache in host memory, ours and the original's. Part d: why the original's D
# is faster (round 40a: 6.93 against 6.67): pinned-memory kinds probed, D with registered and
# with torch-allocated pinned weights, and the original's D. Part e: weight jobs pipelined on the
# copy channel (FLEXGEN_PIPELINED_COPIES) on D, on and off, beside the original's D, after the GPU
# tests. Part f: the same for C. Part g (an H100): D pipelined beside the original's D. Part h
# (same machine): OPT-66B staged with 16 MiB and 64 MiB blocks. The profile and bench steps are
# functions since the runs (same commands).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import flexgen" 2>/dev/null || python3 -m pip install --root-user-action=ignore -q --no-deps --no-index .whl/flexgen-0.1.8-py3-none-any.whl
python3 -c "import attr" 2>/dev/null || python3 -m pip install --root-user-action=ignore -q --no-deps --no-index .whl/attrs-*.whl
python3 -c "import flexgen.flex_opt, attr, tqdm; print('original importable')" || exit 3
profile_once() { # this machine's bandwidths, measured once per machine (the limits use them)
  if [ ! -s ~/.cache/flexgen_repro/hardware_local.json ]; then
    timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
      offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
    echo "profile rc $?"
    if [ -s $O/hardware_local.json ]; then cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
    else cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json; fi
  fi
  grep -E '"h2d|cpu_mem_bytes_s' ~/.cache/flexgen_repro/hardware_local.json | head -8
}
bench() { # tag suite cases timeout
  if [ $((SECONDS + $4)) -gt 595 ]; then echo "$1: skipped (time)"; return; fi
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" >> $O/bench.txt 2>&1
  grep -E '^\[' $O/bench.txt | tail -4
  pkill -9 -f "flexgen_repro[.]flex_[o]pt|flexgen_repro[.]bench[.]origina[l]"; sleep 2
}
case "${1:-a}" in
  a) timeout 120 python3 -m flexgen_repro.bench.original --model opt-125m --percent 100 0 100 0 100 0 \
       --gpu-batch-size 2 --prompt-len 32 --gen-len 4 --gpu-mem-gb 16 --offload-dir /tmp/offload \
       --json-file $O/smoke.json > $O/smoke.txt 2>&1
     rc=$?; echo "smoke rc $rc"; tail -4 $O/smoke.txt; [ $rc -eq 0 ] || exit 4
     profile_once
     bench ad h100-anchors a-6.7b-gpu,d-30b-wcpu,orig-a-6.7b-gpu,orig-d-30b-wcpu 440 ;;
  b) bench c h100-anchors c-30b-paper,orig-c-30b-paper 560 ;;
  d) profile_once
     timeout 60 python3 scripts/device/pin_probe.py | tee $O/pin_probe.json
     bench d h100-anchors d-30b-wcpu 150
     FLEXGEN_PIN=alloc bench d-alloc h100-anchors d-30b-wcpu 150
     bench d-orig h100-anchors orig-d-30b-wcpu 170 ;;
  e) profile_once
     timeout 150 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_storage_copies.py \
       tests/test_runtime.py tests/test_runtime_random.py > $O/tests.txt 2>&1; echo "gpu tests rc $?"; tail -2 $O/tests.txt
     bench d-pipe h100-anchors d-30b-wcpu 150
     FLEXGEN_PIPELINED_COPIES=0 bench d-serial h100-anchors d-30b-wcpu 150
     bench d-orig2 h100-anchors orig-d-30b-wcpu 170 ;;
  f) bench c-pipe h100-anchors c-30b-paper 200
     bench c-orig h100-anchors orig-c-30b-paper 260
     FLEXGEN_PIPELINED_COPIES=0 bench c-serial h100-anchors c-30b-paper 200 ;;
  g) profile_once
     bench d-pipe h100-anchors d-30b-wcpu 150
     bench d-orig2 h100-anchors orig-d-30b-wcpu 170 ;;
  h) bench 66b-pipe h100-large 66b-c-32x2 200   # ran from the command line as these two lines
     FLEXGEN_COPY_CHUNK_MB=64 bench 66b-chunk64 h100-large 66b-c-32x2 200 ;;
  c) bench 66b h100-large 66b-c-32x2,orig-66b-c-32x2 560 ;;
esac
(cd /tmp && tar czf $O/res.tgz res-*) 2>/dev/null
