#!/usr/bin/env bash
# Second GPU-machine round: runtime/compression/kernel tests on CUDA, the h100-anchors cases
# (A, compressed 6.7B, D, C), case A without CUDA graphs (before/after), the kernel benchmark and
# the hardware profile. Everything under $OUT (tarred: at most 8 files come back).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p $O/res /tmp/offload
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $O/gpu.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_runtime.py tests/test_runtime_compression.py \
  tests/test_kernels_gpu.py > $O/pytest_gpu.txt 2>&1; echo "pytest rc $?" >> $O/pytest_gpu.txt
tail -3 $O/pytest_gpu.txt
timeout 60 python3 -m flexgen_repro.flex_opt --model opt-6.7b --path _DUMMY_ --prompt-len 512 --gen-len 32 \
  --gpu-batch-size 2 --percent 100 0 100 0 100 0 --overlap false --gpu-mem-gb 16 --cuda-graphs false \
  --log-file "" --json-file $O/res/a-nographs.json > $O/res/a-nographs.log 2>&1
grep "total throughput" $O/res/a-nographs.log
# invoke is not installed on the GPU machine: call the task's function directly
timeout ${BENCH_T:-330} python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
  suite='h100-anchors', gpu_mem_gb=16.0, out='$O/res', path='_DUMMY_', offload_dir='/tmp/offload',
  cases='${CASES:-a-6.7b-gpu,6.7b-c-72,d-30b-wcpu,c-30b-paper}', profile='h100-issue7'))" > $O/bench.txt 2>&1
tail -8 $O/bench.txt
timeout 80 python3 scripts/bench_kernels.py $O/kernels.json --quick > $O/kernels.txt 2>&1; tail -12 $O/kernels.txt
cd $O && tar czf res.tgz res && rm -rf res
