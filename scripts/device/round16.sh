#!/usr/bin/env bash
# Session 2, round 16 (final anchors at one commit): the hardware profile; A, compressed 6.7B and
# the cost model's OPT-30B choice; C traced (Python GC passes recorded; gc.freeze after warm-up);
# D. Weight prefetch one layer ahead (rounds 14-15), compute on its own stream, copies in pieces.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
timeout 90 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
echo "profile rc $?"; tail -22 $O/profile.txt
if [ -s $O/hardware_local.json ]; then cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
else cp results/device-runs/hardware_local_h200.json ~/.cache/flexgen_repro/hardware_local.json; fi
bench() { # cases timeout
  timeout $2 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-anchors', gpu_mem_gb=16.0, out='/tmp/res', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$1', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -3
}
bench a-6.7b-gpu,6.7b-c-72,30b-auto 240
FLEXGEN_TRACE=$O/c-trace.json bench c-30b-paper 150
bench d-30b-wcpu 130
(cd /tmp && tar czf $O/res.tgz res)
