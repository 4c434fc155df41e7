#!/usr/bin/env bash
# Session 4, round 30 (second call): wait for the background OPT-175B run of round30_175b.sh to end
# (at most WAIT seconds), then return its records.
set -u
O=${OUT:-/tmp/out}; R=/tmp/r30
for _ in $(seq 1 $(( ${WAIT:-560} / 10 ))); do [ -e $R/DONE ] && break; sleep 10; done
tail -25 $R/progress.txt; cat $R/DONE 2>/dev/null || echo "still running"
cat $R/bench.txt | tail -20
cp $R/progress.txt $O/ 2>/dev/null
(cd $R && tar czf $O/res.tgz res bench.txt progress.txt 2>/dev/null)
