#!/usr/bin/env bash
# Where case C's time goes: per-token, per-layer-kind wait and compute (FLEXGEN_PROFILE=1).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLEXGEN_PROFILE=1
O=${OUT:-/tmp/out}; mkdir -p $O /tmp/offload
timeout ${TC:-200} python3 -m flexgen_repro.flex_opt --model opt-30b --path _DUMMY_ --offload-dir /tmp/offload \
  --prompt-len 512 --gen-len 4 --gpu-mem-gb 16 --log-file "" --percent 8 92 0 100 0 100 --gpu-batch-size 16 \
  --num-gpu-batches 3 --cpu-cache-compute --no-warmup 2>&1 | tee $O/c.log | grep -E "profile|flex_opt|total|Error"
