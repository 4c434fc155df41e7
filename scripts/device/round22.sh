#!/usr/bin/env bash
# Session 3, round 22. The trace deadlock is fixed (a GC pass inside the trace lock; rounds 20-21
# lost their traced runs to it). The probe and profile-hardware now measure CPU attention only once
# the host->GPU stream runs, in 64 MiB pieces, over >= 1.5 s (round 19's "busy" figures may have
# ended before the stream started). Then case C traced, and C with an 8-thread kernel team.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
timeout 150 python3 scripts/device/cpu_attn_probe.py $O/cpu_attn_probe.json > $O/probe.txt 2>&1
echo "probe rc $?"; grep variant $O/probe.txt | cut -c1-220
timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
echo "profile rc $?"; grep -E "cpu_attention|description" $O/profile.txt
if [ -s $O/hardware_local.json ]; then cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
else cp results/device-runs/session3/hardware_local_r19.json ~/.cache/flexgen_repro/hardware_local.json; fi
bench() { # out cases timeout
  timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-anchors', gpu_mem_gb=16.0, out='$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$2', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -1
  pkill -9 -f flexgen_repro.flex_opt; sleep 2
}
FLEXGEN_TRACE=$O/c-trace.json bench /tmp/res-trace c-30b-paper 200
grep "\[trace\]" /tmp/res-trace/h100-anchors/logs/c-30b-paper.log | cut -c1-900
FLEXGEN_CPU_ATTN_THREADS=8 bench /tmp/res-t8 c-30b-paper 170
gzip -f $O/c-trace.json
(cd /tmp && tar czf $O/res.tgz res-trace res-t8)
