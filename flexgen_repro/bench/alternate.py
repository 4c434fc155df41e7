"""`python -m flexgen_repro.bench.alternate`: runtime constants compared in one process, in turns.

One flex_opt run is set up once (weights placed, warmed up), then its measured generation runs
`--repeats` times under each `--variant` in turn, so every variant sees the same machine, the same
weights and the same page cache, and slow drifts of the machine fall on all of them alike. A
variant sets module constants that the runtime reads while it generates (its own globals, as that
module reads them), e.g. `steps.MAX_PENDING_STORES=64` or `copy_engine.COPY_IN_FLIGHT=4`, and
`sys.switchinterval=0.0005` for the interpreter's thread switch interval; each turn starts from the
shipped values. Constants read once at setup (a layer's prefetch depth, a ring's block size) are not
for this tool: their change needs a run of its own.

    python -m flexgen_repro.bench.alternate --variant shipped \\
        --variant "stores:steps.MAX_PENDING_STORES=64" --repeats 3 --json-file ab.json -- \\
        --model opt-30b --path _DUMMY_ --percent 55 45 0 100 100 0 --gpu-batch-size 32 \\
        --num-gpu-batches 12 --compress-weight --compress-cache --gpu-mem-gb 16 --gen-len 8

prints a line per generation and, per variant, the median decode and total throughput with their
range, and whether its tokens equal the first variant's; `--json-file` keeps all of it with the
date, device, commit and command line. Exit code 2 with the fix on a bad variant or flex_opt flag.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import json
import statistics
import sys
import time

import numpy as np
import torch

from flexgen_repro import envs, flex_opt
from flexgen_repro.devices import copy_engine
from flexgen_repro.metrics import RunMetrics

SWITCH_INTERVAL = "sys.switchinterval"


def parse_variant(text: str) -> tuple[str, dict]:
    """`[name:]module.CONST=value,...` as (name, {"module.CONST": value}); a bare name (e.g.
    `shipped`) sets nothing. Each target must be an existing upper-case int/float/bool constant of
    a flexgen_repro module (or sys.switchinterval), and the value of its type (ValueError)."""
    name, sep, body = text.partition(":")
    if not sep:
        name, body = (text, "") if "=" not in text else (text, text)
    settings = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        target, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--variant {text!r}: {item!r} is not module.CONST=value")
        settings[target.strip()] = _value(target.strip(), raw.strip(), text)
    return name, settings


def _value(target: str, raw: str, text: str):
    try:
        value = json.loads(raw.lower() if raw.lower() in ("true", "false") else raw)
    except json.JSONDecodeError:
        raise ValueError(f"--variant {text!r}: {raw!r} is not a number or true/false") from None
    if target == SWITCH_INTERVAL:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"--variant {text!r}: {SWITCH_INTERVAL} takes seconds > 0")
        return float(value)
    module, const = _target(target, text)
    current = getattr(module, const)
    if isinstance(current, bool) != isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(current, int) and not isinstance(current, bool) and not isinstance(value, int)):
        raise ValueError(f"--variant {text!r}: {target} is {type(current).__name__} "
                         f"({current!r}); {raw!r} is not")
    return value


def _target(target: str, text: str):
    path, _, const = target.rpartition(".")
    if not path or not const.isupper():
        raise ValueError(f"--variant {text!r}: {target!r} is not module.CONST (e.g. "
                         f"steps.MAX_PENDING_STORES, copy_engine.COPY_IN_FLIGHT)")
    module = None
    for prefix in ("flexgen_repro.", "flexgen_repro.devices.", "flexgen_repro.schedule.",
                   "flexgen_repro.model."):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(prefix + path)
            break
    current = getattr(module, const, None) if module is not None else None
    if not isinstance(current, (int, float)):
        raise ValueError(f"--variant {text!r}: no numeric constant {const} in a flexgen_repro module "
                         f"{path!r}")
    return module, const


@contextlib.contextmanager
def applied(settings: dict):
    """The settings in force; the previous values restored on exit."""
    saved = []
    try:
        for target, value in settings.items():
            if target == SWITCH_INTERVAL:
                saved.append((SWITCH_INTERVAL, None, sys.getswitchinterval()))
                sys.setswitchinterval(value)
                continue
            module, const = _target(target, target)
            saved.append((target, module, getattr(module, const)))
            setattr(module, const, value)
        yield
    finally:
        for target, module, old in reversed(saved):
            if module is None:
                sys.setswitchinterval(old)
            else:
                setattr(module, target.rpartition(".")[2], old)


def summarize(rows: list[dict], names: list[str]) -> list[dict]:
    """Per variant: median and range of decode and total throughput; same tokens as the first
    variant in each repeat; the same tokens in all its own repeats (a generation that varies
    between repeats of one setting is not deterministic, whatever the variants compare)."""
    first = {r["repeat"]: r["tokens"] for r in rows if r["variant"] == names[0]}
    out = []
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        dec, tot = [r["decode_tok_s"] for r in mine], [r["total_tok_s"] for r in mine]
        out.append({"variant": name, "runs": len(mine),
                    "decode_tok_s": statistics.median(dec), "decode_range": [min(dec), max(dec)],
                    "total_tok_s": statistics.median(tot), "total_range": [min(tot), max(tot)],
                    "same_tokens": all(r["tokens"] == first.get(r["repeat"]) for r in mine),
                    "repeatable": len({r["tokens"] for r in mine}) == 1})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexgen_repro.bench.alternate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", required=True,
                   help="[name:]module.CONST=value,... (repeat; a bare name runs the shipped values)")
    p.add_argument("--repeats", type=int, default=3, help="generations per variant, in turns")
    p.add_argument("--json-file", default=None, help="where to write every run and the summary")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("error: give flex_opt's flags after `--` (e.g. -- --model opt-1.3b --path _DUMMY_)",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    args = build_parser().parse_args(argv[:cut])
    fo_argv = argv[cut + 1:]
    envs.use_expandable_segments()
    fo = flex_opt.build_parser().parse_args(fo_argv)
    try:
        variants = [parse_variant(v) for v in args.variant]
        names = [n for n, _ in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"--variant names repeat ({', '.join(names)}); name each one (name:...)")
        if args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        flex_opt.check_args(fo)
        rows = _alternate(fo, variants, args.repeats)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(rows, names)
    for s in summary:
        print(f"{s['variant']}: decode {s['decode_tok_s']:.1f} tok/s ({s['decode_range'][0]:.1f}-"
              f"{s['decode_range'][1]:.1f}), total {s['total_tok_s']:.1f} ({s['total_range'][0]:.1f}-"
              f"{s['total_range'][1]:.1f}), {s['runs']} runs, same tokens: {s['same_tokens']}, "
              f"the same in every repeat: {s['repeatable']}")
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "device": flex_opt.device_name(), "commit": envs.checkout_commit(),
                       "argv": argv, "variants": dict(variants), "rows": rows, "summary": summary},
                      f, indent=2)
    return 0


def _alternate(fo, variants: list[tuple[str, dict]], repeats: int) -> list[dict]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rows = []
    with flex_opt.prepared(fo) as ready:
        lm, n = ready.lm, len(ready.prompts)
        for r in range(repeats):
            for name, settings in variants:
                polls = copy_engine.poll_count()
                with applied(settings):
                    sync()
                    t0 = time.perf_counter()
                    out = lm.generate(ready.prompts, max_new_tokens=fo.gen_len)
                    sync()
                    wall = time.perf_counter() - t0
                times = lm.times
                rate = RunMetrics(n, fo.prompt_len, fo.gen_len, times.prefill_s, times.decode_s, 0, 0)
                row = {"repeat": r, "variant": name, "wall_s": wall, "prefill_s": times.prefill_s,
                       "decode_s": times.decode_s, "decode_tok_s": rate.decode_throughput,
                       "total_tok_s": rate.total_throughput,
                       "copy_polls": copy_engine.poll_count() - polls,
                       "tokens": hashlib.sha256(np.asarray(out).tobytes()).hexdigest()[:16]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
