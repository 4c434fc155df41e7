"""Data parallelism for the text job: `torchrun --nproc-per-node N -m flexgen_repro.generate ...`.

Every rank checks the whole input (bad input: all exit 2 before any weight loads), then takes the
records still to do round-robin in input order and runs them through its own LLM (its own policy,
on GPU LOCAL_RANK, or the host where there is no GPU), appending finished records, flushed and
fsynced, to its part file `<output>.rank<r>`. When every rank is done (a barrier), rank 0 merges
the output and the parts into the output in input order (written beside it, then renamed over
it) and removes the parts. A killed run resumes with `--resume` on any number of ranks: the
records in the output and in every part are done. Several nodes work the same way (`--nnodes`),
with the output on storage they share. The ranks coordinate over gloo: only small objects cross.
"""
from __future__ import annotations

import copy
import datetime
import glob
import json
import logging
import os
import re
import sys

from flexgen_repro.parallel.world import World, gather_objects, process_group, world_from_env

# A rank that finishes early waits this long at the barrier for the slowest one
JOB_TIMEOUT = datetime.timedelta(days=7)
_PART = re.compile(r"\.rank(\d+)$")


def takes(argv: list[str] | None) -> bool:
    """True where the text job runs sharded: in one of several torchrun ranks, or where parts of
    a sharded run are left (a single process then resumes and merges them)."""
    if world_from_env().size > 1:
        return True
    from flexgen_repro import generate as job
    known, _ = job.parser().parse_known_args(argv)
    return bool(part_files(known.output))


def torchrun_command(ranks: int, argv: list[str]) -> list[str]:
    """The command that runs the text job on `ranks` processes of this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(ranks), "-m", "flexgen_repro.generate", *argv]


def part_path(output: str, rank: int) -> str:
    return f"{output}.rank{rank}"


def part_files(output: str) -> list[str]:
    """Every part file of `output` (of any earlier world size), by rank."""
    found = [p for p in glob.glob(glob.escape(output) + ".rank*") if _PART.search(p)]
    return sorted(found, key=lambda p: int(_PART.search(p).group(1)))


def pin_local_gpu(world: World) -> None:
    """This rank sees only GPU LOCAL_RANK (as cuda:0), before anything touches CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    if devices is None:
        import torch
        if not torch.cuda.is_available():
            return
        devices = [str(i) for i in range(torch.cuda.device_count())]
    if world.local_rank >= len(devices):
        from flexgen_repro.text.model import TextJobError
        raise TextJobError(f"local rank {world.local_rank} has no GPU of its own ({len(devices)} "
                           "visible): use --nproc-per-node <= the GPUs of a node")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[world.local_rank]


def done_keys(output: str, resume: bool) -> set[str]:
    """Ids already written: in the output and in every part (a torn last line is cut away)."""
    from flexgen_repro.text import jsonl
    if not resume:
        return set()
    keys = set(jsonl.written_ids(output))
    for part in part_files(output):
        keys.update(jsonl.written_ids(part))
    return keys


def shard_done(input_path: str, done: set[str], world: World) -> set[str]:
    """`done` plus the records other ranks take: the remaining records, round-robin in input
    order, rank r taking the r-th of every `world.size`."""
    from flexgen_repro.text import jsonl
    mine_or_done = set(done)
    n = 0
    for rec in jsonl.read_records(input_path):
        if rec.key in done:
            continue
        if n % world.size != world.rank:
            mine_or_done.add(rec.key)
        n += 1
    return mine_or_done


def check_parts(args) -> None:
    """Parts of a killed sharded run are refused like an existing output."""
    from flexgen_repro.text.model import TextJobError
    parts = part_files(args.output)
    if parts and not (args.resume or args.overwrite):
        raise TextJobError(f"{parts[0]} is left from a killed run: pass --resume to continue it, "
                           "or --overwrite to start over")


def merge(output: str, input_path: str) -> int:
    """The output and its parts as one output in input order (atomically replaced), parts removed;
    returns the records written."""
    from flexgen_repro.text import jsonl
    lines: dict[str, str] = {}
    for path in [output] + part_files(output):
        if not os.path.exists(path):
            continue
        jsonl.written_ids(path)  # cut a torn last line away
        with open(path, encoding="utf-8") as f:
            for line in f:
                lines[jsonl.id_key(json.loads(line)["id"])] = line if line.endswith("\n") else line + "\n"
    tmp = output + ".merging"
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in jsonl.read_records(input_path):
            if rec.key in lines:
                f.write(lines[rec.key])
                written += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    for part in part_files(output):
        os.remove(part)
    return written


def _start(args, world: World) -> None:
    """Overwrite: rank 0 clears the output and every part before any rank writes."""
    if args.overwrite and world.rank == 0:
        for path in [args.output] + part_files(args.output):
            if os.path.exists(path):
                os.remove(path)


def _run_rank(args, world: World, llm, done: set[str]) -> dict:
    """Generate this rank's records into its part file; its totals."""
    from flexgen_repro import generate as job
    mine_or_done = shard_done(args.input, done, world)
    rank_args = copy.copy(args)
    rank_args.output, rank_args.overwrite = part_path(args.output, world.rank), False
    summary = job.scan_input(args.input, llm, rank_args, mine_or_done)
    if not summary.records:
        return dict(prompts=0, generated_tokens=0, wall_s=0.0, policy=None)
    llm.policy = job.policy_from_args(args, llm.config, summary)
    with llm:
        totals = job.run_job(rank_args, llm, args.input, mine_or_done, summary)
    return dict(totals, policy=job.describe(llm.policy))


def run(args, world: World) -> tuple[list[dict], object, int]:
    """Every rank's totals (on rank 0, after the merge), this rank's LLM, and how many records
    were done before."""
    from flexgen_repro.llm import LLM
    from flexgen_repro.text import jsonl
    from flexgen_repro.text.model import TextJobError
    if args.input == "-":
        raise TextJobError("several ranks cannot share standard input: write the prompts to a file "
                           "and pass --input FILE")
    if not os.path.isfile(args.input):
        raise TextJobError(f"no input file {args.input}")
    jsonl.check_output(args.output, args.resume, args.overwrite)
    check_parts(args)
    if args.max_new_tokens < 1:
        raise TextJobError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    llm = LLM(args.model, path=args.path, offload_dir=args.offload_dir, dtype=args.dtype,
              tokenizer=args.tokenizer, hardware=args.hardware)
    done = done_keys(args.output, args.resume)
    from flexgen_repro import generate as job
    job.scan_input(args.input, llm, args, done)  # the whole input, on every rank
    with process_group(world, "gloo", timeout=JOB_TIMEOUT):
        gather_objects(world, None)  # every rank has read what is done before any writes
        _start(args, world)
        gather_objects(world, None)
        totals = _run_rank(args, world, llm, done)
        everyone = gather_objects(world, totals)
        if world.rank == 0:
            merge(args.output, args.input)
        gather_objects(world, None)
    return everyone, llm, len(done)


def main(argv: list[str] | None = None) -> int:
    """A rank of the sharded job: 0 on success, 2 on bad input, 130 when interrupted."""
    from flexgen_repro import generate as job
    from flexgen_repro.text.model import TextJobError
    args = job.parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    world = world_from_env()
    try:
        pin_local_gpu(world)
        everyone, llm, resumed_after = run(args, world)
    except TextJobError as e:
        print(f"generate [rank {world.rank}]: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("generate: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    if world.rank == 0:
        _report(args, llm, everyone, resumed_after)
    return 0


def _report(args, llm, everyone: list[dict], resumed_after: int) -> None:
    """The run record beside the output: the ranks' totals summed, and each rank's."""
    from flexgen_repro import generate as job
    wall = max(t["wall_s"] for t in everyone)
    tokens = sum(t["generated_tokens"] for t in everyone)
    totals = dict(prompts=sum(t["prompts"] for t in everyone), generated_tokens=tokens,
                  wall_s=wall, throughput=tokens / wall if wall > 0 else 0.0)
    record = job.run_record(args, llm, dict(totals, resumed_after=resumed_after))
    record.update(ranks=len(everyone), per_rank=everyone)
    with open(args.output + ".run.json", "w") as f:
        json.dump(record, f, indent=1)
    print(f"generate: {totals['prompts']} prompts over {len(everyone)} ranks, {tokens} tokens in "
          f"{wall:.1f} s ({totals['throughput']:.1f} tok/s)", file=sys.stderr)

