#!/usr/bin/env bash
# Run one benchmark suite on a GPU machine and collect its records into one tarball.
#
#   scripts/run_suite_on_gpu.sh SUITE COMMIT [TARBALL] [-- FLAGS FOR invoke bench]
#
# Run it in the repository root of a copy of the tree (a copy without .git is fine: COMMIT, the
# commit the copy was made from, is stamped on every record through FLEXGEN_REPRO_COMMIT). The
# suite's raw JSON records, tables, plot and logs go into TARBALL (default SUITE-COMMIT.tar.gz);
# unpack it into results/ to publish them, then `invoke results` rebuilds the tables.
set -euo pipefail
usage="usage: scripts/run_suite_on_gpu.sh SUITE COMMIT [TARBALL] [-- FLAGS FOR invoke bench]"
suite=${1:?$usage}
commit=${2:?$usage}
shift 2
tarball="$suite-$commit.tar.gz"
if [[ $# -gt 0 && $1 != "--" ]]; then tarball=$1; shift; fi
if [[ $# -gt 0 && $1 == "--" ]]; then shift; fi
export FLEXGEN_REPRO_COMMIT=$commit
out=$(mktemp -d)
rc=0
python3 -m invoke bench --suite "$suite" --out "$out" "$@" || rc=$?
tar czf "$tarball" -C "$out" .
rm -rf "$out"
echo "records of $suite at $commit: $tarball (invoke bench exit code $rc)"
exit "$rc"
