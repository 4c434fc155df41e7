#!/usr/bin/env bash
# Session 4, round 35 (H100, the warm machine of round 34, three short calls typed inline; kept
# here as run). a) D with blocking waits (FLEXGEN_COPY_POLL_US=0); the call then killed itself:
# its `pkill -f flex_opt` matched the call's own command line (hence the bracketed pattern below).
# b) D with the defaults, D with FLEXGEN_FUSED_DECODE=0, C again (C was cut by its timeout).
# c) profile-hardware on that machine (its link: 48.7 GiB/s pinned, against 51.3 in session 3).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-4a48321}
O=${OUT:-/tmp/out}
b() { timeout $3 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(suite='h100-anchors', gpu_mem_gb=16.0, out='/tmp/q-$1', path='_DUMMY_', offload_dir='/tmp/offload', cases='$2', profile='local'))" >> $O/bench.txt 2>&1; echo "$1: $(grep -E '^\[|failed' $O/bench.txt | tail -1)"; pkill -9 -f "flexgen_repro[.]flex_[o]pt"; sleep 2; }
case "${1:-b}" in
  a) FLEXGEN_COPY_POLL_US=0 b d-poll0 d-30b-wcpu 85 ;;
  b) b d-default d-30b-wcpu 85; FLEXGEN_FUSED_DECODE=0 b d-nofuse d-30b-wcpu 85; b c-again c-30b-paper 110
     (cd /tmp && tar czf $O/res.tgz q-*) ;;
  c) timeout 100 python3 -c "import sys; from flexgen_repro.cost_model.profile import main; sys.exit(main(offload_dir='/tmp/offload', out='$O/hardware_local_r35.json'))" > $O/profile.txt 2>&1 ;;
esac
