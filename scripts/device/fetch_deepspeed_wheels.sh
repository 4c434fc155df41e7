#!/usr/bin/env bash
# Wheels for the DeepSpeed ZeRO-Inference baseline, for carrying to the GPU machine (no network
# there). Run here, in the repository root: fills .whl/ (ignored by git; name it in the run's carry).
# DeepSpeed ships only a source archive; it is built here without its CUDA ops (DS_BUILD_OPS=0:
# they are compiled on first use there, where nvcc and ninja exist). Its needs that the GPU
# image lacks: hjson, pydantic and pydantic's own.
set -euo pipefail
grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl /tmp/ds-src
python3 -m pip download -q --no-deps --no-binary :all: deepspeed==0.19.8 -d /tmp/ds-src
tar xzf /tmp/ds-src/deepspeed-0.19.8.tar.gz -C /tmp/ds-src
(cd /tmp/ds-src/deepspeed-0.19.8 && DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation . -w "$OLDPWD/.whl")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson==3.1.0 pydantic==2.11.9 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1
ls -la .whl
