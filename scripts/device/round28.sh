#!/usr/bin/env bash
# Prepared in session 3 for the next one (not yet run): the DeepSpeed ZeRO-Inference baselines on
# the H100. Here first: `bash scripts/device/fetch_deepspeed_wheels.sh` (fills .whl/); then call the
# device with carry [".whl"], kind nvidia-h100-x1, and `bash scripts/device/round28.sh`.
set -u
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/out}; mkdir -p /tmp/offload ~/.cache/flexgen_repro
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import deepspeed, pydantic; print('deepspeed', deepspeed.__version__, 'pydantic', pydantic.VERSION)"
nvidia-smi --query-gpu=name --format=csv,noheader
cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json
for c in ds-30b-b8 ds-30b-4bit-b8; do
  timeout 280 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
    suite='h100-baselines', gpu_mem_gb=16.0, out='/tmp/res', path='_DUMMY_', offload_dir='/tmp/offload',
    cases='$c', profile='local'))" >> $O/bench.txt 2>&1
  grep -E "^\[|failed|skip" $O/bench.txt | tail -1; tail -5 /tmp/res/h100-baselines/logs/$c.log
done
# case C traced on the H100 (round 22's trace was on an H200), for the prefetch work
FLEXGEN_TRACE=$O/c-trace-h100.json timeout 200 python3 -c "import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
  suite='h100-anchors', gpu_mem_gb=16.0, out='/tmp/res-trace', path='_DUMMY_', offload_dir='/tmp/offload',
  cases='c-30b-paper', profile='local'))" >> $O/bench.txt 2>&1
grep "\[trace\]" /tmp/res-trace/h100-anchors/logs/c-30b-paper.log | cut -c1-900
gzip -f $O/c-trace-h100.json
(cd /tmp && tar czf $O/res.tgz res res-trace)
