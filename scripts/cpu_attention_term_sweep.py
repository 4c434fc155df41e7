"""The cost model's CPU-attention serialization term against the H100 records: predicted decode
(and total) throughput of three OPT-30B CPU-attention policies for a grid of (CPU attention rate
in place, per-batch overhead) settings of the h100-lent profile (16 GiB cap), best fits first.
Session 5 set h100-lent to the best decode fit (45 GFLOP/s, 0.75 ms). Usage:
PYTHONPATH=. python3 scripts/cpu_attention_term_sweep.py"""
import dataclasses

from flexgen_repro.config import get_opt_config
from flexgen_repro.cost_model.cli import parse_flags
from flexgen_repro.cost_model.hardware import load_profile
from flexgen_repro.cost_model.predict import evaluate_policy

MEASURED = [  # (name, flex_opt flags, decode tok/s, total tok/s), H100 records named in the name
    ("C r36 (c2)", "--percent 8 92 0 100 0 100 --gpu-batch-size 16 --num-gpu-batches 3 "
     "--cpu-cache-compute", 38.74, 35.67),
    ("auto r34", "--percent 21 79 0 100 0 100 --gpu-batch-size 12 --num-gpu-batches 6 "
     "--cpu-cache-compute", 45.03, 41.31),
    ("solver-serial r36", "--percent 0 100 22 78 0 100 --gpu-batch-size 32 --num-gpu-batches 2 "
     "--cpu-cache-compute", 48.07, 43.36),
    ("solver-fit r38", "--percent 0 100 21 79 0 100 --gpu-batch-size 24 --num-gpu-batches 3 "
     "--cpu-cache-compute", 53.36, 47.87),
]


def main() -> None:
    base = load_profile("h100-lent").with_memory(gpu_gb=16)
    config = get_opt_config("opt-30b")
    rows = []
    for rate in (40e9, 45e9, 51e9, 60e9, 85e9, 112e9):
        for o_ms in (0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3):
            prof = dataclasses.replace(base, cpu_attention_flop_s=rate,
                                       cpu_attention_batch_overhead_s=o_ms * 1e-3)
            cells, worst = [], 0.0
            for name, flags, decode, total in MEASURED:
                pred = evaluate_policy(config, parse_flags(flags)[0], prof, 512, 32)
                err = pred.decode_throughput / decode - 1
                worst = max(worst, abs(err))
                cells.append(f"{name} decode {pred.decode_throughput:.1f} ({err:+.0%}), "
                             f"total {pred.throughput:.1f} ({pred.throughput / total - 1:+.0%})")
            rows.append((worst, f"rate {rate / 1e9:.0f} GFLOP/s, o {o_ms} ms: " + " | ".join(cells)))
    for worst, line in sorted(rows)[:12]:
        print(f"worst decode error {worst:.1%}: {line}")


if __name__ == "__main__":
    main()
