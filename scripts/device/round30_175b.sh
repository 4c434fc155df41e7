#!/usr/bin/env bash
# Session 4, round 30: OPT-175B in full (case 175b-c-16x2: 4-bit weights 80% in host memory and
# 20% on disk, 4-bit cache in host memory, attention on the GPU; prompt 512, 32 tokens), started in
# its own process session (setsid) so that it outlives one 10-minute command. This call waits
# WAIT seconds and reports; `round30_poll.sh` (the next call, on the same warm machine) waits for
# the end and returns the records. Layers split over disk and host now read both at once.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FLEXGEN_REPRO_COMMIT=${FLEXGEN_REPRO_COMMIT:-unknown}
O=${OUT:-/tmp/out}; R=/tmp/r30; mkdir -p /tmp/offload $R ~/.cache/flexgen_repro
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2; df -h /tmp | tail -1
cp results/device-runs/hardware_local_h100.json ~/.cache/flexgen_repro/hardware_local.json
setsid nohup bash -c "timeout 1560 python3 -c \"import sys; from flexgen_repro.bench.runner import main; sys.exit(main(
  suite='h100-large', gpu_mem_gb=16.0, out='$R/res', path='_DUMMY_', offload_dir='/tmp/offload',
  cases='175b-c-16x2', profile='local'))\" > $R/bench.txt 2>&1; echo rc \$? > $R/DONE" > /dev/null 2>&1 < /dev/null &
sleep 5
cat > $R/progress.sh <<'LOOP'
R=/tmp/r30
while [ ! -e $R/DONE ]; do
  echo "$(date +%T) $(free -g | awk '/Mem/{print "used",$3,"avail",$7}') $(tail -c 300 $R/res/h100-large/logs/175b-c-16x2.log 2>/dev/null | tail -1 | cut -c1-150)"
  sleep 30
done
LOOP
setsid nohup bash $R/progress.sh > $R/progress.txt 2>&1 < /dev/null &
sleep ${WAIT:-540}
cat $R/progress.txt | tail -20; cat $R/DONE 2>/dev/null
