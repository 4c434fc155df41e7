#!/usr/bin/env bash
# Fourth GPU-machine round: re-profile, case C at the original's physical placement, the cost
# model's OPT-30B choice, the HF Accelerate baseline, and calibration policies. PART=a or b.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p $O/res /tmp/offload ~/.cache/flexgen_repro
timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # suite cases timeout
  timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$1', gpu_mem_gb=16.0, out='$O/res', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$2', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -8
}
if [ "${PART:-a}" = a ]; then
  bench h100-anchors c-30b-paper,30b-auto 300
  bench h100-baselines hf-6.7b-b2 90
  bench calibration cal-6.7b-w50-8x1,cal-6.7b-wcpu-8x1,cal-6.7b-wcpu-cpuattn-32x2 150
else
  bench calibration cal-30b-cw-cpuattn-32x1,cal-30b-w10-8x1 240
  bench h100-large 66b-c-32x2 300
fi
cd $O && tar czf res.tgz res && rm -rf res
