#!/usr/bin/env bash
# Session 4, round 31 (H100). Round 29: A fused+qkv 251.6 (general 243.9); C with pinned async
# copies 26.6, worse than synchronous 29.9 (the result's copy to the GPU still waited behind the
# weight pieces, now stalling the compute stream). Now: a gate that holds weight pieces back while
# a small host->GPU copy is pending; graphed decode pipelined (next token queued before the last
# one's ids are collected). GPU tests; A pipelined off/on; C synchronous, staged+gate; then the
# DeepSpeed 4-bit case (TORCH_CUDA_ARCH_LIST sanitized).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_decode.py tests/test_runtime.py \
  tests/test_storage_copies.py > $O/tests.txt 2>&1
echo "tests rc $?"; tail -3 $O/tests.txt
bench() { # tag suite cases timeout
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" >> $O/bench.txt 2>&1
  echo "$1: $(grep -E '^\[|failed|skip' $O/bench.txt | tail -1)"
  pkill -9 -f flexgen_repro.flex_opt; sleep 2
}
FLEXGEN_GRAPH_PIPELINE=0 bench a-nopipe h100-anchors a-6.7b-gpu 80
FLEXGEN_GRAPH_PIPELINE=1 bench a-pipe h100-anchors a-6.7b-gpu 80
FLEXGEN_HOST_STAGE=0 bench c-sync h100-anchors c-30b-paper 130
FLEXGEN_HOST_STAGE=1 FLEXGEN_LINK_GATE=1 bench c-gate h100-anchors c-30b-paper 130
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  PYTHONPATH=$PWD:/tmp/site bench ds4 h100-baselines ds-30b-4bit-b8 170
  tail -4 /tmp/res-ds4/h100-baselines/logs/ds-30b-4bit-b8.log | cut -c1-400
fi
(cd /tmp && tar czf $O/res.tgz res-*)
