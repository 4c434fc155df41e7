"""Calibration: the cost model's predictions against measured runs, as a CSV, a Markdown table and
a scatter plot with the median and worst relative error; and, optionally, a fit of a few profile
fields to the runs (as the paper fits its hardware constants), reported with leave-one-out errors
so the fit is not judged on the runs it was fitted to.

A record is one measured run (a flex_opt JSON record, or any dict with the same fields): model,
prompt_len, gen_len, percent ("a b c d e f" or six numbers), gpu_batch_size, num_gpu_batches,
cpu_cache_compute, compress_weight, compress_cache, total_throughput; optional pin_weight,
overlap, sep_layer, dtype, prefill_latency_s, decode_throughput, peak_gpu_mem_gb (the allocator's
peak, compared with the predicted peak GPU memory).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import statistics
import sys

from scipy.optimize import minimize

from flexgen_repro.config import get_model_config
from flexgen_repro.cost_model.hardware import GIB, HardwareProfile, load_profile, save_profile
from flexgen_repro.cost_model.predict import Prediction, evaluate_policy
from flexgen_repro.policy import Policy, parse_percent

# Fields a fit may scale (by 1/10 .. 10): those the micro-benchmarks measure least like the runtime.
DEFAULT_FIT = ("gpu_step_overhead_s", "cpu_attention_flop_s")
OVERHEAD_SEED_S = 1e-4   # starting point of a step overhead the profile leaves at 0
COLUMNS = ("model", "prompt_len", "gen_len", "percent", "gpu_batch_size", "num_gpu_batches",
           "cpu_cache_compute", "compress_weight", "compress_cache", "measured_throughput",
           "predicted_throughput", "ratio", "rel_error", "measured_prefill_s", "predicted_prefill_s",
           "measured_decode_throughput", "predicted_decode_throughput", "prefill_bound",
           "decode_bound", "fits", "measured_peak_gpu_gib", "predicted_peak_gpu_gib")


def _flag(value, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def record_policy(rec: dict) -> Policy:
    """The Policy a measured record ran."""
    pct = rec["percent"]
    pct = parse_percent(pct.split() if isinstance(pct, str) else pct)
    return Policy(gpu_batch_size=int(rec["gpu_batch_size"]), num_gpu_batches=int(rec["num_gpu_batches"]),
                  w_gpu_percent=pct[0], w_cpu_percent=pct[1], cache_gpu_percent=pct[2],
                  cache_cpu_percent=pct[3], act_gpu_percent=pct[4], act_cpu_percent=pct[5],
                  cpu_cache_compute=_flag(rec.get("cpu_cache_compute")),
                  compress_weight=_flag(rec.get("compress_weight")),
                  compress_cache=_flag(rec.get("compress_cache")),
                  pin_weight=_flag(rec.get("pin_weight"), True), overlap=_flag(rec.get("overlap"), True),
                  sep_layer=_flag(rec.get("sep_layer"), True))


def predict_record(rec: dict, profile: HardwareProfile) -> Prediction:
    dtype = rec.get("dtype") or "float16"
    config = get_model_config(rec["model"], dtype=dtype)
    return evaluate_policy(config, record_policy(rec), profile, int(rec["prompt_len"]), int(rec["gen_len"]))


def _optional(rec: dict, key: str):
    value = rec.get(key)
    return float(value) if value not in (None, "") else ""


def compare(records: list[dict], profile) -> list[dict]:
    """One row (COLUMNS) per record: measured against predicted (`profile`: one, or one per record)."""
    profiles = profile if isinstance(profile, (list, tuple)) else [profile] * len(records)
    rows = []
    for rec, prof in zip(records, profiles):
        pred, measured = predict_record(rec, prof), float(rec["total_throughput"])
        if measured <= 0:
            raise ValueError(f"record of {rec['model']} {rec['percent']} has total_throughput "
                             f"{measured}; calibration needs measured runs")
        pol = record_policy(rec)
        rows.append(dict(
            model=rec["model"], prompt_len=int(rec["prompt_len"]), gen_len=int(rec["gen_len"]),
            percent=" ".join(f"{v:g}" for v in pol.percent), gpu_batch_size=pol.gpu_batch_size,
            num_gpu_batches=pol.num_gpu_batches, cpu_cache_compute=int(pol.cpu_cache_compute),
            compress_weight=int(pol.compress_weight), compress_cache=int(pol.compress_cache),
            measured_throughput=measured, predicted_throughput=pred.throughput,
            ratio=pred.throughput / measured, rel_error=abs(pred.throughput - measured) / measured,
            measured_prefill_s=_optional(rec, "prefill_latency_s"), predicted_prefill_s=pred.prefill_time,
            measured_decode_throughput=_optional(rec, "decode_throughput"),
            predicted_decode_throughput=pred.decode_throughput, prefill_bound=pred.prefill_bound,
            decode_bound=pred.decode_bound, fits=int(pred.feasible),
            measured_peak_gpu_gib=_optional(rec, "peak_gpu_mem_gb"),
            predicted_peak_gpu_gib=pred.peak_memory.get("gpu", 0.0) / GIB))
    return rows


def summary(rows: list[dict]) -> dict:
    errors = [r["rel_error"] for r in rows]
    worst = max(rows, key=lambda r: r["rel_error"])
    return {"n": len(rows), "median_rel_error": statistics.median(errors),
            "worst_rel_error": worst["rel_error"],
            "worst_case": f"{worst['model']} {worst['percent']} "
                          f"{worst['gpu_batch_size']}x{worst['num_gpu_batches']}"}


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], stats: dict, profile: HardwareProfile, note: str = "") -> str:
    cols = ("model", "percent", "gpu_batch_size", "num_gpu_batches", "cpu_cache_compute",
            "compress_weight", "compress_cache", "measured_throughput", "predicted_throughput",
            "rel_error", "prefill_bound", "decode_bound", "measured_peak_gpu_gib",
            "predicted_peak_gpu_gib")
    lines = [f"Cost model ({profile.name}: {profile.description}) against measured throughput "
             f"(token/s), {stats['n']} runs: median relative error {stats['median_rel_error']:.1%}, "
             f"worst {stats['worst_rel_error']:.1%} ({stats['worst_case']}).{' ' + note if note else ''}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], stats: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meas = [r["measured_throughput"] for r in rows]
    pred = [r["predicted_throughput"] for r in rows]
    lo, hi = min(meas + pred) / 1.5, max(meas + pred) * 1.5
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.fill_between([lo, hi], [lo * 0.75, hi * 0.75], [lo * 1.25, hi * 1.25], color="0.9", label="±25%")
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured")
    for r in rows:
        ax.scatter(r["measured_throughput"], r["predicted_throughput"], s=30)
        label = f"{r['model']} {r['percent']} {r['gpu_batch_size']}x{r['num_gpu_batches']}"
        ax.annotate(label, (r["measured_throughput"], r["predicted_throughput"]),
                    fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured token/s",
           ylabel="predicted token/s",
           title=f"median error {stats['median_rel_error']:.1%}, worst {stats['worst_rel_error']:.1%}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_report(records: list[dict], profile: HardwareProfile, out_dir: str,
                 stem: str = "cost_model_calibration", per_record: list | None = None,
                 note: str = "") -> dict:
    """Write <stem>.csv, .md and .png under `out_dir`; returns the summary and the paths.
    `per_record`: a profile for each record (leave-one-out fits) instead of `profile`; `note`:
    a sentence added to the Markdown caption."""
    if not records:
        raise ValueError("write_report needs at least one measured record")
    rows = compare(records, per_record or profile)
    stats = summary(rows)
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, stats, profile, note))
    plot(rows, stats, paths["png"])
    return {**stats, **paths}


def _log_error(records: list[dict], profile: HardwareProfile) -> float:
    return sum(math.log(predict_record(r, profile).throughput / float(r["total_throughput"])) ** 2
               for r in records)


def fit_profile(records: list[dict], profile: HardwareProfile,
                fields: tuple = DEFAULT_FIT) -> HardwareProfile:
    """`profile` with `fields` scaled (each by 1/10 .. 10) to minimize the squared log error of the
    predicted throughput of `records`."""
    unknown = [f for f in fields if not hasattr(profile, f) or f == "name"]
    if unknown:
        raise ValueError(f"cannot fit {unknown}: not numeric HardwareProfile fields")
    base = {f: getattr(profile, f) or OVERHEAD_SEED_S for f in fields}

    def build(theta) -> HardwareProfile:
        return dataclasses.replace(profile, **{f: base[f] * math.exp(t) for f, t in zip(fields, theta)})
    res = minimize(lambda t: _log_error(records, build(t)), [0.0] * len(fields), method="Powell",
                   bounds=[(-math.log(10), math.log(10))] * len(fields))
    fitted = build(res.x)
    note = f"{', '.join(fields)} fitted to {len(records)} measured runs (least squares of log ratio)"
    return dataclasses.replace(fitted, name=f"{profile.name}-fitted",
                               sources={**profile.sources, "fit": note})


def leave_one_out(records: list[dict], profile: HardwareProfile, fields: tuple = DEFAULT_FIT) -> list:
    """For each record, the profile fitted to all the other records."""
    return [fit_profile(records[:i] + records[i + 1:], profile, fields) for i in range(len(records))]


def load_records(paths: list[str]) -> list[dict]:
    """Our runtime's measured records from JSON files (one object, a list, or JSON lines) or folders
    searched for *.json at any depth (a bench output folder keeps its records under raw/). Records
    of other systems (a `system` field: the original FlexGen, HF Accelerate, DeepSpeed, which a
    bench folder holds beside ours) and failed runs are left out: the model predicts our runtime."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    records = []
    for path in files:
        with open(path) as f:
            text = f.read().strip()
        try:
            data = json.loads(text)
            records += data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records
            if isinstance(r, dict) and r.get("measured", True) and r.get("total_throughput")
            and r.get("status", "ok") == "ok" and not r.get("system")]


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m flexgen_repro.cost_model.calibrate", description=__doc__)
    p.add_argument("records", nargs="+", help="measured JSON records (files or folders)")
    p.add_argument("--hardware", default="local")
    p.add_argument("--out", default="results/calibration")
    p.add_argument("--fit", default="", help=f"comma-separated fields to fit, e.g. {','.join(DEFAULT_FIT)}")
    a = p.parse_args()
    try:
        recs, prof = load_records(a.records), load_profile(a.hardware)
        if not recs:
            raise ValueError(f"no measured records (JSON with a total_throughput) in {' '.join(a.records)}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    report = {"measured_profile": write_report(recs, prof, a.out)}
    if a.fit:
        fields = tuple(a.fit.split(","))
        fitted = fit_profile(recs, prof, fields)
        report["fitted_profile"] = save_profile(fitted, os.path.join(a.out, "hardware_fitted.json"))
        report["leave_one_out"] = write_report(
            recs, fitted, a.out, "cost_model_calibration_fitted",
            per_record=leave_one_out(recs, prof, fields),
            note=f"Each run is predicted by {', '.join(fields)} fitted to the other runs (leave-one-out).")
    print(json.dumps(report, indent=2))
    sys.exit(0)
