#!/usr/bin/env bash
# The original FlexGen as a wheel for the GPU machine (no network there), for the `original`
# runner (flexgen_repro/bench/original.py, the orig-* cases of h100-anchors and h100-large).
# Run here, in the repository root: fills .whl/ (ignored by git; name it in the run's carry).
# `flexgen` 0.1.8 is pure Python; of its needs the GPU image may lack `attrs` (its flex_opt
# imports it) and `pulp` (only its policy search imports that; not carried).
set -euo pipefail
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl flexgen==0.1.8 attrs==25.4.0
ls -la .whl
