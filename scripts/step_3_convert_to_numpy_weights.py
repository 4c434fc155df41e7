#!/usr/bin/env python3
"""Step 3 of the original OPT instructions: a checkpoint into the numpy weight folder.

--ckpt-path may be a Hugging Face OPT checkpoint folder (config.json plus safetensors or .bin), a
consolidated metaseq `.pt` (what the original step 2 wrote), a folder of metaseq `reshard-model_part-*.pt`
files, or the folder of the 992 shards (then this does what step 2 does). Streaming and resumable:
same code as `invoke prepare-weights`.

    python scripts/step_3_convert_to_numpy_weights.py --ckpt-path CKPT --output-folder ~/opt_weights/opt-175b-np
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-path", required=True, help="the checkpoint (file or folder) to convert")
    parser.add_argument("--output-folder", required=True, help="the weight folder to write, e.g. .../opt-175b-np")
    parser.add_argument("--model", default=None,
                        help="check the checkpoint against this model's shapes "
                             "(default: the sizes the checkpoint shows)")
    args = parser.parse_args(argv)
    from flexgen_repro.config import get_opt_config
    from flexgen_repro.weights.prepare import convert_source
    try:
        config = get_opt_config(args.model) if args.model else None
        folder = convert_source(args.ckpt_path, args.output_folder, config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
