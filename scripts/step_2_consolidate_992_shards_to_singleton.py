#!/usr/bin/env python3
"""Step 2 of the original OPT-175B instructions, done in one streaming pass.

The original consolidated Meta's 992 shard files into one 350 GB singleton (about 700 GB of RAM) and
step 3 then split it into numpy files. This script reads the 992 files and writes the numpy weight
folder directly, one tensor at a time (peak memory about twice the largest tensor, 2.4 GB for
OPT-175B; no temporary singleton), so step 3 is not needed. It resumes where an interrupted run
stopped. Same code as `invoke prepare-weights --model opt-175b --source DIR`.

    python scripts/step_2_consolidate_992_shards_to_singleton.py \
        --read-prefix /data/opt175b/checkpoint_last --output-folder ~/opt_weights/opt-175b-np
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--read-prefix", required=True,
                        help="folder of the 992 files, or its prefix path .../checkpoint_last as in the original")
    parser.add_argument("--output-folder", "--save-prefix", dest="output_folder",
                        default="~/opt_weights/opt-175b-np",
                        help="the weight folder to write (default ~/opt_weights/opt-175b-np); --save-prefix is "
                             "accepted for the original's command line and names the same folder")
    parser.add_argument("--model", default="opt-175b",
                        help="check the shards against this model's shapes (default opt-175b); "
                             "'infer' takes the sizes from the shards (scaled-down checkpoints)")
    args = parser.parse_args(argv)
    from flexgen_repro.config import get_opt_config
    from flexgen_repro.weights.metaseq import convert_metaseq_shards
    from flexgen_repro.weights.prepare import RELEASE_175B
    src = os.path.expanduser(args.read_prefix)
    src = src if os.path.isdir(src) else os.path.dirname(src)
    try:
        config = None if args.model == "infer" else get_opt_config(args.model)
        parts, shards = RELEASE_175B if config is not None and config.name == "opt-175b" else (None, None)
        folder = convert_metaseq_shards(src, args.output_folder, config=config, parts=parts, shards=shards)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder} (numpy weight folder: step 3 is not needed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
