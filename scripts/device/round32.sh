#!/usr/bin/env bash
# Session 4, round 32 (H100). Round 31: A 261.9 (not pipelined) / 264.1 (pipelined); C staged +
# gate 28.1 against synchronous 30.8 (still worse: traced here to see why). Then: decode linears at
# batch 2 in cuBLAS against a Triton small-M kernel (probe, and A with FLEXGEN_SMALL_LINEAR=1 side
# by side); at the end OPT-175B starts in the background (round30_175b.sh), polled by the next call.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py -k small_linear > $O/tests.txt 2>&1
echo "tests rc $?"; tail -2 $O/tests.txt
timeout 150 python3 scripts/device/gemv_probe.py $O/gemv_probe.json > $O/gemv.txt 2>&1
echo "probe rc $?"; python3 - $O/gemv_probe.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r["m"], r["n"], r["k"], "cublas %.0f GB/s %.1f us" % (r["cublas"]["gbs"], r["cublas"]["us"]),
          "triton %.0f GB/s %.1f us" % (r["triton"]["gbs"], r["triton"]["us"]), r["triton_config"][:60])
PY
bench() { # tag suite cases timeout
  timeout $4 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='$2', gpu_mem_gb=16.0, out='/tmp/res-$1', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$3', profile='local'))" >> $O/bench.txt 2>&1
  echo "$1: $(grep -E '^\[|failed|skip' $O/bench.txt | tail -1)"
  pkill -9 -f flexgen_repro.flex_opt; sleep 2
}
FLEXGEN_SMALL_LINEAR=0 bench a-cublas h100-anchors a-6.7b-gpu 80
FLEXGEN_SMALL_LINEAR=1 bench a-triton h100-anchors a-6.7b-gpu 80
FLEXGEN_TRACE=$O/c-gate-trace.json bench c-gate-traced h100-anchors c-30b-paper 130
gzip -f $O/c-gate-trace.json
(cd /tmp && tar czf $O/res.tgz res-*)
echo "175B starts at $SECONDS s"
WAIT=$((580 - SECONDS)) bash scripts/device/round30_175b.sh
