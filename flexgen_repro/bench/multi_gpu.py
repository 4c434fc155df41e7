"""Multi-GPU benchmark cases: pipeline parallelism over `gpus` ranks on one node, ours
(`flexgen-dist`: dist_flex_opt) and the original's (`original-dist`: bench/original_dist.py),
each launched with torchrun; the refusal of a suite that needs more GPUs than the machine has;
and the scaling table.

Scaling efficiency of a case run on N GPUs is its total throughput over N times that of its
1-GPU twin: the case of the same id with `-<N>gpu` replaced by `-1gpu` (so a suite names its
cases `<shape>-1gpu`, `<shape>-2gpu`, `<shape>-4gpu`).
"""
from __future__ import annotations

import csv
import json
import os
import re

from flexgen_repro.bench.suites import DIST_RUNNERS, Case

_GPUS = re.compile(r"-(\d+)gpu$")
SCALING_COLUMNS = ("case", "runner", "model", "gpus", "total_throughput", "decode_throughput",
                   "baseline_case", "speedup", "scaling_efficiency")


def gpus_needed(cases: list[Case]) -> int:
    return max([c.gpus for c in cases], default=1)


def check_gpus(cases: list[Case], hardware: dict) -> None:
    """Refuse (ValueError: exit 2) cases that need more GPUs than this machine has."""
    needed = gpus_needed(cases)
    have = int(hardware.get("gpu_count") or 0)
    if needed > 1 and needed > have:
        many = sorted({c.case for c in cases if c.gpus > have})
        raise ValueError(f"{len(many)} case(s) need {needed} GPUs (e.g. {many[0]}); this machine has "
                         f"{have}: run them on a machine with {needed} GPUs, or select cases with "
                         f"--cases")


def _torchrun(case: Case, s) -> list[str]:
    return [s.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(case.gpus)]


def command(case: Case, s, json_file: str, log_file: str) -> list[str]:
    """The torchrun command line of a flexgen-dist or original-dist case (one micro-batch per
    stage: --num-inner-iterations = gpus, the original's default)."""
    from flexgen_repro.bench import runner
    if case.runner not in DIST_RUNNERS:
        raise ValueError(f"{case.case}: runner {case.runner!r} is not a multi-GPU runner")
    if case.runner == "flexgen-dist":
        single = runner.flexgen_command(case, s, json_file, log_file)
        module = "flexgen_repro.dist_flex_opt"
    else:
        single = runner.original_command(case, s, json_file, log_file)
        module = "flexgen_repro.bench.original_dist"
        single += ["--log-prefix", os.path.splitext(log_file)[0]]
    flags = single[3:]  # after [python, -m, module]
    return _torchrun(case, s) + ["-m", module, *flags, "--comm-device", "gpu"]


def scaling_rows(records: list[dict]) -> list[dict]:
    """One row per multi-GPU record that ran and has a 1-GPU twin that ran."""
    by_case = {r["case"]: r for r in records if r.get("status") == "ok"}
    rows = []
    for r in by_case.values():
        found = _GPUS.search(r["case"])
        if not found or int(found.group(1)) == 1:
            continue
        gpus = int(found.group(1))
        twin = by_case.get(_GPUS.sub("-1gpu", r["case"]))
        if twin is None or not twin.get("total_throughput"):
            continue
        speedup = r["total_throughput"] / twin["total_throughput"]
        rows.append(dict(case=r["case"], runner=r.get("runner"), model=r.get("model"), gpus=gpus,
                         total_throughput=r["total_throughput"],
                         decode_throughput=r.get("decode_throughput"), baseline_case=twin["case"],
                         speedup=speedup, scaling_efficiency=speedup / gpus))
    return sorted(rows, key=lambda row: row["case"])


def write_scaling(suite_dir: str) -> list[str]:
    """scaling.csv and scaling.md from raw/*.json where the suite has multi-GPU records."""
    raw = os.path.join(suite_dir, "raw")
    if not os.path.isdir(raw):
        return []
    records = []
    for name in sorted(os.listdir(raw)):
        if name.endswith(".json"):
            with open(os.path.join(raw, name)) as f:
                records.append(json.load(f))
    rows = scaling_rows(records)
    if not rows:
        return []
    csv_path, md_path = os.path.join(suite_dir, "scaling.csv"), os.path.join(suite_dir, "scaling.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SCALING_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(md_path, "w") as f:
        f.write("| " + " | ".join(SCALING_COLUMNS) + " |\n|" + "---|" * len(SCALING_COLUMNS) + "\n")
        for row in rows:
            f.write("| " + " | ".join(_cell(row[c]) for c in SCALING_COLUMNS) + " |\n")
    return [csv_path, md_path]


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
