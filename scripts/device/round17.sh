#!/usr/bin/env bash
# Session 2, round 17: the hardware profile (runtime's cache-store path, the runtime's CPU attention,
# the fused dequantize kernel), then the calibration suite on the current runtime.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
timeout 90 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
echo "profile rc $?"; tail -24 $O/profile.txt
cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
timeout ${TCAL:-460} python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
  suite='calibration', gpu_mem_gb=16.0, out='/tmp/res', path='_DUMMY_', offload_dir='/tmp/offload',
  profile='local'))" > $O/cal.txt 2>&1
grep -E "^\[|failed|skip" $O/cal.txt | tail -8
(cd /tmp && tar czf $O/res.tgz res)
