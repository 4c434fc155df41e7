#!/usr/bin/env bash
# Session 3, round 24: the anchors at one commit on the final code. Round 23's single pinned copy
# of queries (to_host) waited on cudaHostAlloc behind the weight copy (to_cpu 3.0 -> 21 s): reverted;
# the 12-thread kernel team stays (the main thread no longer starves while it runs). The profile,
# then C, A, D, the compressed OPT-6.7B case and the cost model's OPT-30B choice.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
echo "profile rc $?"; grep -E "cpu_attention|cpu_to_gpu_bytes|description" $O/profile.txt
if [ -s $O/hardware_local.json ]; then cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
else cp results/device-runs/session3/hardware_local_r22.json ~/.cache/flexgen_repro/hardware_local.json; fi
bench() { # cases timeout
  timeout $2 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-anchors', gpu_mem_gb=16.0, out='/tmp/res', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$1', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -1
  pkill -9 -f flexgen_repro.flex_opt; sleep 2
}
bench c-30b-paper 150
bench a-6.7b-gpu 80
bench d-30b-wcpu 130
bench 6.7b-c-72 90
bench 30b-auto 130
grep -h "auto chose" -r /tmp/res | cut -c1-300
(cd /tmp && tar czf $O/res.tgz res)
