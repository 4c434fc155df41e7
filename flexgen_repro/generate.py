"""`python -m flexgen_repro.generate` / `invoke generate`: a file of prompts in, completions out.

Input: JSONL objects with "prompt" and optional "id" (default: the line number), other fields
passed through; a `.txt` file is one prompt per line; `-` is standard input. Output: JSONL in input
order. The input is checked in full before any weight loads (bad input: exit code 2). Records run in
windows (`--window` prompts, whole blocks), sorted by length inside a window; finished records are
appended in input order, flushed and fsynced, so a killed run continues with `--resume`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass

from flexgen_repro import envs
from flexgen_repro.policy import Policy, parse_percent
from flexgen_repro.text import jsonl
from flexgen_repro.text.model import DEFAULT_MODEL, TextJobError, auto_policy, describe

# prompts per window (--window), at least MIN_WINDOW_BLOCKS blocks: records held in memory and
# sorted by length inside. A larger window packs prompts of closer lengths into each block (on the
# text bench's corpus, whose lengths spread log-normally, padding falls from 42% of the prompt
# positions with 128 prompts a window to 8% with 2000, blocks of 32); a killed run redoes at most
# the window it was in, and memory grows with it (the window's token ids).
WINDOW_PROMPTS = 2048
MIN_WINDOW_BLOCKS = 4
TOKENIZE_CHUNK = 1024       # prompts tokenized at once while checking the input


@dataclass(frozen=True)
class InputSummary:
    records: int            # records still to generate
    done: int               # records already in the output (resume)
    longest: int            # tokens of the longest prompt to generate (after truncation)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexgen_repro.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a known name or a local checkpoint folder")
    p.add_argument("--input", required=True, help="JSONL, .txt (one prompt per line) or - (stdin)")
    p.add_argument("--output", required=True, help="output JSONL (a run record goes to OUTPUT.run.json)")
    p.add_argument("--path", default="~/opt_weights", help="folder of <name>-np/, or _DUMMY_")
    p.add_argument("--offload-dir", default="~/flexllmgen_offload_dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--percent", nargs="+", default=["auto"], help='six numbers, or "auto" (cost model)')
    p.add_argument("--hardware", default=None, help="cost-model profile for --percent auto")
    p.add_argument("--gpu-batch-size", type=int, default=4)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="+", default=None, help="strings that end a completion")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="compute dtype (default: float16 on a GPU, float32 without one)")
    p.add_argument("--truncate", default=None, choices=["left"],
                   help="keep the tail of prompts too long for the model")
    for flag in ("--compress-weight", "--compress-cache", "--cpu-cache-compute"):
        p.add_argument(flag, action="store_true")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an existing output")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--window", type=int, default=WINDOW_PROMPTS,
                   help="prompts sorted by length together (rounded to whole blocks, at least 4); "
                   "larger: less padding, more work redone after a kill")
    p.add_argument("--log-every", type=float, default=1.0, help="seconds between progress updates")
    return p


def policy_from_args(args, config, summary: InputSummary) -> Policy:
    """The policy the flags give, or the cost model's (`--percent auto`)."""
    if [v.lower() for v in args.percent] == ["auto"]:
        chosen = auto_policy(config, summary.longest, args.max_new_tokens, summary.records,
                             args.hardware, compress=args.compress_weight or args.compress_cache)
        return chosen
    try:
        pct = parse_percent(args.percent)
        return Policy(gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
                      w_gpu_percent=pct[0], w_cpu_percent=pct[1], cache_gpu_percent=pct[2],
                      cache_cpu_percent=pct[3], act_gpu_percent=pct[4], act_cpu_percent=pct[5],
                      cpu_cache_compute=args.cpu_cache_compute, compress_weight=args.compress_weight,
                      compress_cache=args.compress_cache)
    except ValueError as e:
        raise TextJobError(str(e)) from None


def scan_input(path: str, llm, args, done: set[str]) -> InputSummary:
    """Check every record (JSON, prompt, unique id, length) without loading weights."""
    seen: set[str] = set()
    todo = longest = 0
    chunk: list[jsonl.Record] = []

    def check(records: list[jsonl.Record]) -> int:
        ids = llm.check_lengths(llm.tokenize([r.prompt for r in records]), args.max_new_tokens,
                                [repr(r.id) for r in records], args.truncate)
        return max(len(t) for t in ids)
    for rec in jsonl.read_records(path):
        if rec.key in seen:
            raise TextJobError(f"{path} line {rec.line}: id {rec.id!r} appears twice; ids must be unique")
        seen.add(rec.key)
        if rec.key in done:
            continue
        todo += 1
        chunk.append(rec)
        if len(chunk) == TOKENIZE_CHUNK:
            longest, chunk = max(longest, check(chunk)), []
    if chunk:
        longest = max(longest, check(chunk))
    if not seen:
        raise TextJobError(f"{path} holds no prompts")
    stray = done - seen
    if stray:
        raise TextJobError(f"{args.output} holds {len(stray)} id(s) not in {path} (e.g. {sorted(stray)[0]}): "
                           "it belongs to another input; pass --overwrite to start over")
    return InputSummary(todo, len(done), longest)


class WindowRun:
    """Runs the records of one window and writes the finished ones in input order."""

    def __init__(self, llm, args, writer: jsonl.OutputWriter, bar):
        self.llm, self.args, self.writer, self.bar = llm, args, writer, bar
        self.generated = 0
        self.started = time.perf_counter()

    def run(self, records: list[jsonl.Record]) -> None:
        if not records:
            return
        llm, args = self.llm, self.args
        ids = llm.check_lengths(llm.tokenize([r.prompt for r in records]), args.max_new_tokens,
                                [repr(r.id) for r in records], args.truncate)
        done: dict[int, object] = {}
        next_out = 0

        def on_block(index, completions) -> None:
            nonlocal next_out
            done.update(zip((int(i) for i in index), completions))
            ready = []
            while next_out in done:
                ready.append(jsonl.output_record(records[next_out], done.pop(next_out)))
                next_out += 1
            self.writer.write(ready)
            self.generated += sum(len(c.token_ids) for c in completions)
            rate = self.generated / max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self.bar.update(len(completions))
        llm.generate_ids(ids, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                         args.stop, on_block=on_block)


def window_prompts(requested: int, block_size: int) -> int:
    """Prompts per window: `requested` rounded down to whole blocks, at least MIN_WINDOW_BLOCKS."""
    return max(requested // block_size, MIN_WINDOW_BLOCKS) * block_size


def run_job(args, llm, input_path: str, done: set[str], summary: InputSummary) -> dict:
    """Generate every record not in `done`, window by window; return the run's totals."""
    from tqdm import tqdm
    llm.plan_len = summary.longest + args.max_new_tokens  # the cache lengths of every window's blocks
    writer = jsonl.OutputWriter(args.output, overwrite=args.overwrite)
    window_size = window_prompts(args.window, llm.policy.block_size)
    with tqdm(total=summary.records, unit="prompt", file=sys.stderr, mininterval=args.log_every,
              desc="generate") as bar:
        job = WindowRun(llm, args, writer, bar)
        window: list[jsonl.Record] = []
        try:
            for rec in jsonl.read_records(input_path):
                if rec.key in done:
                    continue
                window.append(rec)
                if len(window) == window_size:
                    job.run(window)
                    window = []
            job.run(window)
        finally:
            writer.close()
    wall = time.perf_counter() - job.started
    return dict(prompts=summary.records, resumed_after=summary.done, generated_tokens=job.generated,
                wall_s=round(wall, 3), throughput=job.generated / wall if wall > 0 else 0.0)


def run_record(args, llm, totals: dict) -> dict:
    """The JSON record written beside the output."""
    policy = llm.policy
    shape = {} if policy is None else dict(
        policy=describe(policy), percent=list(policy.percent), gpu_batch_size=policy.gpu_batch_size,
        num_gpu_batches=policy.num_gpu_batches, compress_weight=policy.compress_weight,
        compress_cache=policy.compress_cache, cpu_cache_compute=policy.cpu_cache_compute)
    return dict(model=llm.config.name, weights="dummy" if llm.dummy else os.path.expanduser(args.path),
                dtype=str(llm.config.dtype), **shape, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, **totals,
                commit=envs.checkout_commit(), machine=_machine(), input=args.input, output=args.output,
                finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _machine() -> dict:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(host=platform.node(), cpu=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), gpu=gpu, torch=torch.__version__)


def main(argv: list[str] | None = None) -> int:
    """0 on success, 2 on bad input (the message names the fix), 130 when interrupted."""
    from flexgen_repro.parallel import shards
    if shards.takes(argv):  # torchrun's ranks, or the parts they left: sharded
        return shards.main(argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    spooled = None
    try:
        from flexgen_repro.llm import LLM
        jsonl.check_output(args.output, args.resume, args.overwrite)
        if args.max_new_tokens < 1:
            raise TextJobError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.window < 1:
            raise TextJobError(f"--window must be >= 1 (prompts sorted together), got {args.window}")
        llm = LLM(args.model, path=args.path, offload_dir=args.offload_dir, dtype=args.dtype,
                  tokenizer=args.tokenizer, hardware=args.hardware)
        input_path = args.input
        if input_path == "-":
            input_path = spooled = jsonl.spool_stdin(os.path.dirname(os.path.abspath(args.output)))
        elif not os.path.isfile(input_path):
            raise TextJobError(f"no input file {input_path}")
        done = set(jsonl.written_ids(args.output)) if args.resume else set()
        summary = scan_input(input_path, llm, args, done)
        if summary.records:
            llm.policy = policy_from_args(args, llm.config, summary)
            with llm:
                totals = run_job(args, llm, input_path, done, summary)
        else:
            totals = dict(prompts=0, resumed_after=summary.done, generated_tokens=0, wall_s=0.0,
                          throughput=0.0)
    except TextJobError as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("generate: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        if spooled is not None:
            os.remove(spooled)
    record = run_record(args, llm, totals)
    with open(args.output + ".run.json", "w") as f:
        json.dump(record, f, indent=1)
    print(f"generate: {totals['prompts']} prompts, {totals['generated_tokens']} tokens in "
          f"{totals['wall_s']:.1f} s ({totals['throughput']:.1f} tok/s), policy "
          f"{record.get('policy', 'none (nothing left to do)')}, {record['dtype']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
