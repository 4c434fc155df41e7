#!/usr/bin/env bash
# First GPU-machine round: environment, micro-measurements, runtime tests on CUDA, OPT-1.3B
# schedules with weights on CPU and disk, and the h100 anchor cases A and D. Writes under $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p $O/rec
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-300
free -g; df -h / /tmp | cat
python3 -c "import torch,transformers,sys;print(sys.version);print('torch',torch.__version__,'tf',transformers.__version__)"
python3 -c "import triton;print('triton',triton.__version__)"; python3 -c "import psutil,scipy,pytest;print('ok deps')"
python3 -c "import accelerate;print('accelerate',accelerate.__version__)"
} > $O/env.txt 2>&1
timeout 120 python3 scripts/device/micro.py > $O/micro.json 2>&1
timeout 150 python3 -m pytest -q -x tests/test_runtime.py -p no:cacheprovider > $O/pytest_gpu.txt 2>&1; echo "pytest rc $?" >> $O/pytest_gpu.txt
run() { # name, then flex_opt args
  local name=$1; shift
  timeout ${T:-90} python3 -m flexgen_repro.flex_opt --path _DUMMY_ --offload-dir /tmp/offload \
    --log-file "" --json-file $O/rec/$name.json "$@" > $O/rec/$name.log 2>&1
  echo "$name rc=$? $(grep 'total throughput' $O/rec/$name.log)"
}
M="--model opt-1.3b --prompt-len 512 --gen-len 32"
{
run 13b-cpu-normal $M --gpu-batch-size 16 --num-gpu-batches 1 --percent 0 100 100 0 100 0 --overlap false
run 13b-cpu-overlap1 $M --gpu-batch-size 16 --num-gpu-batches 1 --percent 0 100 100 0 100 0
run 13b-cpu-overlap4 $M --gpu-batch-size 16 --num-gpu-batches 4 --percent 0 100 100 0 100 0
run 13b-disk-normal $M --gpu-batch-size 16 --num-gpu-batches 1 --percent 0 0 100 0 100 0 --overlap false
run 13b-disk-overlap1 $M --gpu-batch-size 16 --num-gpu-batches 1 --percent 0 0 100 0 100 0
run 13b-disk-overlap4 $M --gpu-batch-size 16 --num-gpu-batches 4 --percent 0 0 100 0 100 0
run 13b-gpu $M --gpu-batch-size 16 --num-gpu-batches 1 --percent 100 0 100 0 100 0
run A-67b-gpu --model opt-6.7b --prompt-len 512 --gen-len 32 --gpu-batch-size 2 --percent 100 0 100 0 100 0 --overlap false --gpu-mem-gb 16
T=240 run D-30b-stream --model opt-30b --prompt-len 512 --gen-len 32 --gpu-batch-size 8 --percent 0 100 100 0 100 0 --gpu-mem-gb 16
} 2>&1 | tee $O/summary.txt
cd $O && tar czf rec.tgz rec && rm -rf rec
