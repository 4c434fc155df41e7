"""WikiText-sample perplexity of SmolLM2-135M-Instruct with 4-bit weights and KV cache:
writes results/compression-smollm2/ (see flexgen_repro/eval/compression_study.py)."""
import sys

from flexgen_repro.eval.compression_study import main

if __name__ == "__main__":
    sys.exit(main())
