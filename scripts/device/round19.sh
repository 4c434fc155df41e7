#!/usr/bin/env bash
# Session 3, round 19: the C CPU-attention kernel (kernels/cpu_attention.c). Probe at case C's
# shape (torch path vs kernel at 4-16 threads, alone and under a pinned host->GPU stream), the
# kernel's tests on this machine, the hardware profile (CPU attention now through the kernel),
# then case C with the kernel and without it (FLEXGEN_CPU_ATTN_KERNEL=0), side by side.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
nproc; gcc --version | head -1; grep -m1 "model name" /proc/cpuinfo
timeout 150 python3 scripts/device/cpu_attn_probe.py $O/cpu_attn_probe.json > $O/probe.txt 2>&1
echo "probe rc $?"; cat $O/probe.txt | cut -c1-300
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cpu_attention.py 2>&1 | tail -2
timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
echo "profile rc $?"; grep -E "cpu_attention|description" $O/profile.txt
if [ -s $O/hardware_local.json ]; then cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
else cp results/device-runs/hardware_local_h200.json ~/.cache/flexgen_repro/hardware_local.json; fi
bench() { # out cases timeout
  timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-anchors', gpu_mem_gb=16.0, out='$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$2', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -2
}
bench /tmp/res-kernel c-30b-paper 170
FLEXGEN_CPU_ATTN_KERNEL=0 bench /tmp/res-torch c-30b-paper 170
(cd /tmp && tar czf $O/res.tgz res-kernel res-torch)
