"""The cost model's CPU-attention serialization term against session 4's H100 records: predicted
throughput of case C and of the solver's earlier OPT-30B choice for a few (CPU attention rate,
per-batch overhead) settings of the h100-lent profile (16 GiB cap). Usage:
python3 scripts/cpu_attention_term_sweep.py"""
import dataclasses

from flexgen_repro.config import get_opt_config
from flexgen_repro.cost_model.cli import parse_flags
from flexgen_repro.cost_model.hardware import load_profile
from flexgen_repro.cost_model.predict import evaluate_policy

MEASURED = [  # (name, flex_opt flags, total tok/s measured on the H100: results/device-runs/session4)
    ("C r34", "--percent 8 92 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 --cpu-cache-compute", 32.26),
    ("C r33", "--percent 8 92 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 --cpu-cache-compute", 36.97),
    ("auto r34", "--percent 21 79 0 100 0 100 --gpu-batch-size 12 --num-gpu-batches 6 --cpu-cache-compute", 41.31),
]


def main() -> None:
    base = load_profile("h100-lent").with_memory(gpu_gb=16)
    config = get_opt_config("opt-30b")
    for rate in (base.cpu_attention_flop_s, 51e9):
        for o_ms in (0, 1, 1.5, 2, 3, 3.5):
            prof = dataclasses.replace(base, cpu_attention_flop_s=rate,
                                       cpu_attention_batch_overhead_s=o_ms * 1e-3)
            cells = []
            for name, flags, measured in MEASURED:
                pred = evaluate_policy(config, parse_flags(flags)[0], prof, 512, 32)
                cells.append(f"{name} {pred.throughput:.1f} ({pred.throughput / measured - 1:+.0%})")
            print(f"rate {rate / 1e9:.0f} GFLOP/s, o {o_ms} ms: " + " | ".join(cells))


if __name__ == "__main__":
    main()
