#!/usr/bin/env bash
# Third GPU-machine round: the hardware profile, then the h100-anchors suite (graph decode reused
# across runs, case C under the 16 GiB cap, the cost model's OPT-30B choice, OPT-1.3B schedules)
# and extra calibration policies for the cost model. Everything under $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p $O/res /tmp/offload
timeout 150 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
echo "profile rc $?"; tail -25 $O/profile.txt
mkdir -p ~/.cache/flexgen_repro && cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # suite cases timeout
  timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$1', gpu_mem_gb=16.0, out='$O/res', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$2', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -20
}
bench h100-anchors a-6.7b-gpu,c-30b-paper,6.7b-c-72,30b-auto ${T1:-300}
bench h100-anchors 1.3b-gpu-1x16,1.3b-wcpu-noverlap-1x16,1.3b-wcpu-overlap-1x16,1.3b-wcpu-overlap-4x4,1.3b-wdisk-noverlap-1x16,1.3b-wdisk-overlap-1x16,1.3b-wdisk-overlap-4x4,1.3b-cdisk-cpuattn-1x16 ${T2:-200}
cd $O && tar czf res.tgz res && rm -rf res
