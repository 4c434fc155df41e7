"""The text bench: the batch job on a corpus of real prompts (text_corpus.py), one case per process.

    python -m flexgen_repro.bench.text_bench --model opt-6.7b --path _DUMMY_ --percent 100 0 100 0 100 0 \
        --gpu-batch-size 32 --num-gpu-batches 1 --prompt-len 512 --gen-len 32 --json-file r.json

Runner `text`: the text job (`LLM`, in the windows `invoke generate` sorts by length) on the
first `--prompts` prompts of the corpus (default: all of it; prompts longer than `--prompt-len`
tokens keep their tail), after a one-block warm-up. Runner `text-hf`: transformers' batched
`generate` on the same prompts, in the same windows sorted the same way, a block at a time,
left-padded to the longest of each batch. Runner `text-fixed`: the text job as `text` runs it, on
as many synthetic prompts of exactly `--prompt-len` tokens (the fixed-length figure over the same
number of blocks, sustained as the corpus run is, not one block). All report useful tokens per
second: generated tokens (not padding, not filler rows) over the wall time; ours also each block's
phase times (`block_times`: prompts, longest prompt in tokens, prefill s, decode s, in run order).
Dummy-weight cases need a tokenizer (`--tokenizer`, default: the GPT-2 BPE one
text_corpus.build_tokenizer makes offline) and say the weights were dummy.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time

from flexgen_repro.bench import suites, text_corpus

DUMMY = "_DUMMY_"


def command(case, s, json_file: str, log_file: str) -> list[str]:
    """The command line of a `text` or `text-hf` case (runner.py's builder for them)."""
    cmd = [s.python, "-m", "flexgen_repro.bench.text_bench", "--runner", case.runner,
           "--model", case.model, "--path", s.weight_path(case), "--offload-dir", s.offload_dir,
           "--prompt-len", str(case.prompt_len), "--gen-len", str(case.gen_len),
           "--percent", *case.percent.split(), "--dtype", case.dtype]
    for flag, value in (("--gpu-batch-size", case.gpu_batch_size),
                        ("--num-gpu-batches", case.num_gpu_batches), ("--gpu-mem-gb", s.cap(case))):
        cmd += [flag, f"{value:g}" if isinstance(value, float) else str(value)] if value else []
    cmd += ["--prompts", str(case.prompts)] if case.prompts else []
    cmd += [flag for flag, on in (("--cpu-cache-compute", case.cpu_cache_compute),
                                  ("--compress-weight", case.compress_weight),
                                  ("--compress-cache", case.compress_cache)) if on]
    if case.runner == "text" and (case.compress_weight or case.compress_cache):
        cmd.append("--compare-uncompressed")
    return cmd + ["--json-file", json_file, "--log-file", log_file]


def _prompt_ids(llm_or_tok, prompt_len: int, count: int | None) -> list[list[int]]:
    """The first `count` corpus prompts (None: all) as ids, each cut to its last `prompt_len` tokens."""
    prompts = text_corpus.read_prompts(limit=count)
    ids = llm_or_tok(prompts)["input_ids"] if callable(llm_or_tok) else llm_or_tok.tokenize(prompts)
    return [list(t)[-prompt_len:] for t in ids]


def fixed_ids(prompt_len: int, count: int | None, vocab: int, seed: int = 0) -> list[list[int]]:
    """As many prompts as `_prompt_ids` gives for `count` (None: the corpus), each exactly
    `prompt_len` ids drawn as the fixed-length benchmark draws them (flex_opt.synthetic_prompts)."""
    from flexgen_repro.flex_opt import synthetic_prompts
    n = len(text_corpus.read_prompts(limit=count))
    return synthetic_prompts(n, prompt_len, vocab, seed).tolist()


def windows(ids: list, block: int) -> list[list]:
    """`ids` cut into the windows `invoke generate` sorts together (blocks of `block` prompts)."""
    from flexgen_repro.generate import WINDOW_PROMPTS, window_prompts
    size = window_prompts(WINDOW_PROMPTS, block)
    return [ids[s:s + size] for s in range(0, len(ids), size)]


def run_windows(llm, ids: list, gen_len: int, on_block=None) -> tuple[list, "GenerateStats"]:
    """`ids` window by window, as the command runs them: the completions and the summed stats."""
    from flexgen_repro.llm import GenerateStats
    stats, done = GenerateStats(), []
    for window in windows(ids, llm.policy.block_size):
        done += llm.generate_ids(window, gen_len, on_block=on_block)
        stats = stats.plus(llm.stats)
    return done, stats


def run_flexgen(args, policy, tokenizer: str) -> dict:
    """Our job: warm-up on one block, then the prompts window by window, as the command runs them."""
    from flexgen_repro.llm import LLM
    from flexgen_repro.metrics import PeakMemory
    with LLM(args.model, path=args.path, policy=policy, offload_dir=args.offload_dir,
             dtype=args.dtype, tokenizer=tokenizer, hardware=args.hardware) as llm:
        if policy is None:  # the cost model's choice for the corpus cap
            llm.policy = _auto(llm, args)
        block = llm.policy.block_size
        ids = fixed_ids(args.prompt_len, args.prompts, llm.config.vocab_size) \
            if args.runner == "text-fixed" else _prompt_ids(llm, args.prompt_len, args.prompts)
        llm.plan_len = max(map(len, ids)) + args.gen_len
        llm.generate_ids(ids[:block], args.gen_len)
        phases = {"prefill_s": 0.0, "decode_s": 0.0}
        per_block = []

        def on_block(index, completions) -> None:
            times = llm._lm.times
            phases["prefill_s"] += times.prefill_s
            phases["decode_s"] += times.decode_s
            per_block.append([len(completions), max(c.prompt_tokens for c in completions),
                              round(times.prefill_s, 5), round(times.decode_s, 5)])
        with PeakMemory() as peak:
            done, stats = run_windows(llm, ids, args.gen_len, on_block)
        pol = llm.policy
    extra = {}
    if args.compare_uncompressed:
        plain = dataclasses.replace(pol, compress_weight=False, compress_cache=False)
        with LLM(args.model, path=args.path, policy=plain, offload_dir=args.offload_dir,
                 dtype=args.dtype, tokenizer=tokenizer) as llm:
            llm.plan_len = max(map(len, ids)) + args.gen_len
            extra = agreement(done, run_windows(llm, ids, args.gen_len)[0])
    return dict(**extra, prompts=stats.prompts, prompt_tokens=stats.prompt_tokens,
                generated_tokens=stats.generated_tokens, wall_s=stats.wall_s,
                padded_positions=stats.padded_positions, blocks=stats.blocks,
                prefill_latency_s=phases["prefill_s"], decode_latency_s=phases["decode_s"],
                block_times=per_block, allocator_events=peak.allocator_events,
                copy_polls=peak.copy_polls,
                peak_gpu_mem_gb=peak.gpu_peak_bytes / 2**30, peak_cpu_mem_gb=peak.cpu_peak_bytes / 2**30,
                percent=" ".join(f"{v:g}" for v in pol.percent), gpu_batch_size=pol.gpu_batch_size,
                num_gpu_batches=pol.num_gpu_batches)


def agreement(ours: list, reference: list) -> dict:
    """How often completions agree with the reference run's: whole completions, and tokens
    before the first difference (as a fraction of the reference's tokens)."""
    same = sum(a.token_ids == b.token_ids for a, b in zip(ours, reference))
    lead = 0
    for a, b in zip(ours, reference):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                 min(len(a.token_ids), len(b.token_ids)))
        lead += n
    total = sum(len(b.token_ids) for b in reference)
    return dict(agreement_with_uncompressed=same / len(reference),
                leading_token_agreement=lead / total if total else 1.0)


def _auto(llm, args):
    from flexgen_repro.text.model import auto_policy
    return auto_policy(llm.config, args.prompt_len, args.gen_len, 1 << 20, args.hardware)


def run_transformers(args, tokenizer: str) -> dict:
    """transformers' batched generate, `--gpu-batch-size` x `--num-gpu-batches` prompts a batch,
    batched as our job's blocks are (each window sorted by length, longest first); the wall time
    is the full generations', prefill is timed apart as one-token generations."""
    import torch
    from transformers import AutoTokenizer
    from flexgen_repro.metrics import PeakMemory
    from flexgen_repro.text.batching import longest_first
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    model = _hf_model(args)
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    batch = args.gpu_batch_size * args.num_gpu_batches
    ids = _prompt_ids(tok, args.prompt_len, args.prompts)
    ids = [w[i] for w in windows(ids, batch) for i in longest_first(w)]
    dev = next(model.parameters()).device
    pad = model.config.pad_token_id
    pad = min(eos) if pad is None else pad      # a model without a pad id pads with an eos id

    def generate(rows: list[list[int]], new_tokens: int) -> int:
        """Tokens generated, counted as our job counts them: each row's up to its first eos,
        that one included (a finished row is padded after it)."""
        width = max(map(len, rows))
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, t in enumerate(rows):
            x[r, width - len(t):] = torch.tensor(t)
            mask[r, width - len(t):] = 1
        with torch.no_grad():
            out = model.generate(x.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad)
        return sum(next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                   for row in out[:, width:].tolist())

    def timed(rows: list[list[int]], new_tokens: int) -> tuple[int, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        made = generate(rows, new_tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return made, time.perf_counter() - start
    generate(ids[:batch], args.gen_len)
    made = wall = prefill = 0.0
    with PeakMemory() as peak:
        for i in range(0, len(ids), batch):
            prefill += timed(ids[i:i + batch], 1)[1]  # prefill alone: a one-token generation
            n, t = timed(ids[i:i + batch], args.gen_len)
            made, wall = made + n, wall + t
    return dict(prompts=len(ids), prompt_tokens=sum(map(len, ids)), generated_tokens=int(made),
                wall_s=wall, blocks=-(-len(ids) // batch), prefill_latency_s=prefill,
                decode_latency_s=max(wall - prefill, 1e-9),
                peak_gpu_mem_gb=peak.gpu_peak_bytes / 2**30, peak_cpu_mem_gb=peak.cpu_peak_bytes / 2**30,
                hf_batch_size=batch)


def checkpoint(model: str) -> str:
    """The local checkpoint folder of a model name or folder (any family the runtime knows)."""
    from flexgen_repro.text import model as text_model
    found = text_model.checkpoint_dir(model, text_model.model_config(model))
    if found is None:
        raise FileNotFoundError(f"no local checkpoint of {model}: pass --model with its folder")
    return found


def _hf_model(args):
    """The case's model in transformers: its checkpoint, or (dummy weights, OPT) random in place."""
    import torch
    from transformers import AutoModelForCausalLM, OPTForCausalLM
    from flexgen_repro.bench.baselines import hf_opt_config
    from flexgen_repro.config import get_opt_config
    dtype = getattr(torch, args.dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.path != DUMMY:
        return AutoModelForCausalLM.from_pretrained(checkpoint(args.model), dtype=dtype).to(dev).eval()
    with torch.device("meta"):
        model = OPTForCausalLM(hf_opt_config(get_opt_config(args.model)))
    model = model.to_empty(device=dev).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.tie_weights()
    return model.eval()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexgen_repro.bench.text_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runner", default="text", choices=list(suites.TEXT_RUNNERS))
    p.add_argument("--model", required=True)
    p.add_argument("--path", default=DUMMY)
    p.add_argument("--offload-dir", default="~/flexllmgen_offload_dir")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's, or GPT-2 BPE for dummy")
    p.add_argument("--prompt-len", type=int, default=512, help="prompts keep at most this many tokens")
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--percent", nargs="+", default=["auto"])
    p.add_argument("--gpu-batch-size", type=int, default=4)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--hardware", default=None)
    p.add_argument("--gpu-mem-gb", type=float, default=None, help="recorded; caps the cost model's GPU")
    for flag in ("--cpu-cache-compute", "--compress-weight", "--compress-cache"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--prompts", type=int, default=None, help="corpus prompts to run (default: all)")
    p.add_argument("--compare-uncompressed", action="store_true",
                   help="also run without compression; record how often completions agree")
    p.add_argument("--json-file", default=None)
    p.add_argument("--log-file", default=None)
    return p


def record(args, run: dict, tokenizer: str) -> dict:
    """The JSON record: the run's counts, useful throughput and the context tables need."""
    import torch
    from flexgen_repro import envs
    from flexgen_repro.flex_opt import device_name
    wall = run["wall_s"]
    useful = run["generated_tokens"] / wall if wall else 0.0
    padded = run.get("padded_positions")
    decode_s = run.get("decode_latency_s")
    return dict(
        run, model=args.model, runner=args.runner, weights="dummy" if args.path == DUMMY else "real",
        tokenizer=tokenizer, prompt_len=args.prompt_len, gen_len=args.gen_len, dtype=args.dtype,
        useful_throughput=useful, total_throughput=useful,
        padding_fraction=1 - run["prompt_tokens"] / padded if padded else None,
        mean_prompt_tokens=run["prompt_tokens"] / run["prompts"],
        decode_throughput=(run["generated_tokens"] - run["prompts"]) / decode_s if decode_s else None,
        compress_weight=args.compress_weight, compress_cache=args.compress_cache,
        cpu_cache_compute=args.cpu_cache_compute, gpu_mem_cap_gb=args.gpu_mem_gb,
        device=device_name(),
        torch_version=torch.__version__, commit=envs.checkout_commit(), measured=True,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        log_text=(f"{run['prompts']} prompts ({run['prompt_tokens']} prompt tokens), "
                  f"{run['generated_tokens']} generated in {wall:.2f} s: {useful:.2f} useful tok/s"))


def main(argv: list[str] | None = None) -> int:
    from flexgen_repro.cost_model.cli import parse_flags
    from flexgen_repro.metrics import write_outputs
    args = parser().parse_args(argv)
    try:
        tokenizer = args.tokenizer or (text_corpus.build_tokenizer() if args.path == DUMMY
                                       else checkpoint(args.model))
        policy = None
        if args.runner != "text-hf" and [v.lower() for v in args.percent] != ["auto"]:
            flags = [f"--percent {' '.join(args.percent)}", f"--gpu-batch-size {args.gpu_batch_size}",
                     f"--num-gpu-batches {args.num_gpu_batches}"]
            flags += [f for f in ("--cpu-cache-compute", "--compress-weight", "--compress-cache")
                      if getattr(args, f[2:].replace("-", "_"))]
            policy, _ = parse_flags(" ".join(flags))
    except (ValueError, FileNotFoundError) as e:
        print(f"text_bench: {e}", file=sys.stderr)
        return 2
    run = run_transformers(args, tokenizer) if args.runner == "text-hf" else \
        run_flexgen(args, policy, tokenizer)
    rec = record(args, run, tokenizer)
    header = f"model: {args.model}, runner: {args.runner}, percent: {rec.get('percent', 'hf')}"
    write_outputs(rec, header, args.log_file, args.json_file)
    print(rec["log_text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
