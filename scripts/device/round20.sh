#!/usr/bin/env bash
# Session 3, round 20: what binds case C now that CPU attention runs in the C kernel (round 19:
# 31.25 tok/s, 1.43 s per decode step against 0.95 s of weights over PCIe). C traced; C with a
# 12-thread kernel team; C with weights prefetched two layers ahead; C with attention and MLP as
# one layer (one weight load each). Then profile-hardware's CPU attention alone in a fresh process.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/session3/hardware_local_r19.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # out cases timeout
  timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-anchors', gpu_mem_gb=16.0, out='$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$2', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -1
}
FLEXGEN_TRACE=$O/c-trace.json bench /tmp/res-trace c-30b-paper 150
grep "\[trace\]" /tmp/res-trace/h100-anchors/logs/c-30b-paper.log | cut -c1-600
FLEXGEN_CPU_ATTN_THREADS=12 bench /tmp/res-t12 c-30b-paper 150
FLEXGEN_PREFETCH_LAYERS=2 bench /tmp/res-pf2 c-30b-paper 150
timeout 150 python3 -m flexgen_repro.flex_opt --model opt-30b --path _DUMMY_ --offload-dir /tmp/offload \
  --prompt-len 512 --gen-len 32 --percent 8 92 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 \
  --sep-layer false --cpu-cache-compute --gpu-mem-gb 16 --json-file $O/c-onelayer.json 2>&1 | tail -4
timeout 60 python3 -c "
import torch; from flexgen_repro.cost_model.profile import measure_cpu
print('measure_cpu alone', measure_cpu(True, 5, torch.device('cuda'))['cpu_attention'] / 1e9, 'GFLOP/s')"
gzip -f $O/c-trace.json
(cd /tmp && tar czf $O/res.tgz res-trace res-t12 res-pf2)
