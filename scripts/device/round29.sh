#!/usr/bin/env bash
# Session 4, round 29 (H100). GPU tests of the new paths; then side by side in one call:
# A with the general decode layers, with the fused resident decode (SDPA over the home buffer,
# heads as views, ReLU in fc1's GEMM) and with q/k/v fused too; C with CPU attention's copies
# synchronous (pageable) and through pinned buffers, asynchronously (HostStage).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_decode.py tests/test_runtime.py \
  tests/test_kernels_cpu_attention.py > $O/tests.txt 2>&1
echo "tests rc $?"; tail -3 $O/tests.txt
bench() { # tag cases timeout
  timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-anchors', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$2', profile='local'))" >> $O/bench.txt 2>&1
  echo "$1: $(grep -E '^\[|failed|skip' $O/bench.txt | tail -1)"
  pkill -9 -f flexgen_repro.flex_opt; sleep 2
}
FLEXGEN_FUSED_DECODE=0 FLEXGEN_FUSE_QKV=0 bench a-general a-6.7b-gpu 90
FLEXGEN_FUSED_DECODE=1 FLEXGEN_FUSE_QKV=0 bench a-fused a-6.7b-gpu 90
FLEXGEN_FUSED_DECODE=1 FLEXGEN_FUSE_QKV=1 bench a-fusedqkv a-6.7b-gpu 90
FLEXGEN_HOST_STAGE=0 bench c-sync c-30b-paper 150
FLEXGEN_HOST_STAGE=1 bench c-staged c-30b-paper 150
(cd /tmp && tar czf $O/res.tgz res-*)
