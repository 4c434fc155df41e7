#!/usr/bin/env bash
# Mount this AWS machine's local instance-store NVMe drive (the largest; xfs) at
# MOUNT_PATH/flexllmgen_offload_dir, owned by you.
# The same code as `invoke setup-nvme --cloud aws`; further flags (--dry-run, --force,
# --devices DEV,...) pass through. Runs itself through sudo unless --dry-run.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 MOUNT_PATH [--dry-run] [--force] [--devices DEV,...]" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(command -v "${PYTHON:-python3}")"
cmd=("$python" -m flexgen_repro.nvme --cloud aws --mount-path "$1" "${@:2}")
if [[ $EUID -ne 0 && " $* " != *" --dry-run "* ]]; then
  exec sudo env "PYTHONPATH=$repo" "${cmd[@]}"
fi
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "${cmd[@]}"
