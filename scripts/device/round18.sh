#!/usr/bin/env bash
# Session 2, round 18: the profile again (CPU attention measured at OPT-30B size while the link
# streams), the solver's OPT-30B choice with it, then OPT-66B with 4-bit weights and cache in host memory.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
timeout 60 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(
  offload_dir='/tmp/offload', out='$O/hardware_local.json'))" > $O/profile.txt 2>&1
echo "profile rc $?"; grep -E "cpu_attention|gpu_to_cpu_cache|description" $O/profile.txt
cp $O/hardware_local.json ~/.cache/flexgen_repro/hardware_local.json
bench() { # suite cases timeout
  timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$1', gpu_mem_gb=16.0, out='/tmp/res', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$2', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -2
}
bench h100-anchors 30b-auto 200
bench h100-large 66b-c-32x2 320
grep -h "auto chose" -r /tmp/res | cut -c1-400
(cd /tmp && tar czf $O/res.tgz res)
