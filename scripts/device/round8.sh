#!/usr/bin/env bash
# Case C in full with the per-token breakdown (FLEXGEN_PROFILE=1): where the decode time goes.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLEXGEN_PROFILE=1
O=${OUT:-/tmp/out}; mkdir -p $O /tmp/offload
timeout ${TC:-420} python3 -m flexgen_repro.flex_opt --model opt-30b --path _DUMMY_ --offload-dir /tmp/offload \
  --prompt-len 512 --gen-len 32 --gpu-mem-gb 16 --log-file "" --percent 8 92 0 100 0 100 --gpu-batch-size 16 \
  --num-gpu-batches 3 --cpu-cache-compute --json-file $O/c-30b-paper.json 2>&1 | tee $O/c.log \
  | grep -E "profile\] token (0|1|2|16|31)|flex_opt|total|Error"
