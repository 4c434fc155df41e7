#!/usr/bin/env bash
# Session 3, round 23: case C after round 22's trace. The CPU attention team now leaves 4 cores to
# the threads beside it (round 22's trace: the main thread's work for the next GPU batch took 7 ms
# instead of 2.5 while the 16-thread kernel ran), queries reach the host in one pinned copy, and
# the host mask is kept per step. C untraced; C traced; C traced prefetching two layers ahead (the
# link idled ~8 ms of each 31.5 ms layer in round 22's trace).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/session3/hardware_local_r22.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # out cases timeout
  timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-anchors', gpu_mem_gb=16.0, out='$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$2', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -1
  pkill -9 -f flexgen_repro.flex_opt; sleep 2
}
bench /tmp/res-c c-30b-paper 170
FLEXGEN_TRACE=$O/c-trace.json bench /tmp/res-trace c-30b-paper 190
grep "\[trace\] decode" /tmp/res-trace/h100-anchors/logs/c-30b-paper.log | cut -c1-900
FLEXGEN_PREFETCH_LAYERS=2 FLEXGEN_TRACE=$O/c-pf2-trace.json bench /tmp/res-pf2 c-30b-paper 190
grep "\[trace\] decode" /tmp/res-pf2/h100-anchors/logs/c-30b-paper.log | cut -c1-900
gzip -f $O/c-trace.json $O/c-pf2-trace.json
(cd /tmp && tar czf $O/res.tgz res-c res-trace res-pf2)
