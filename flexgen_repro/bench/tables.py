"""Tables and plots of a suite, made only from its raw JSON records (`results/<suite>/raw/*.json`):
`<suite>.csv` (every column), `<suite>.md` (the contract's columns beside the reference figure,
ratio and hardware limit, with skip and failure reasons below) and `<suite>.png` (ours against
the reference, bar chart). `invoke results` rebuilds them for every suite folder.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import statistics
import sys

CONTRACT_COLUMNS = ("model", "prompt_len", "gen_len", "percent", "gpu_batch_size", "num_gpu_batches",
                    "compress_weight", "compress_cache", "cpu_cache_compute", "prefill_latency_s",
                    "decode_throughput", "total_throughput", "peak_gpu_mem_gb", "device", "commit")
COMPARISON_COLUMNS = ("paper_throughput", "ratio", "limit_throughput", "fraction_of_limit",
                      "binding_term")
CSV_COLUMNS = ("case", "status", *CONTRACT_COLUMNS[:9], "overlap", "sep_layer", "pin_weight",
               "attn_sparsity", "dtype", "gpu_mem_cap_gb", "prefill_latency_s", "decode_latency_s",
               "total_latency_s", "decode_throughput", "total_throughput", "peak_gpu_mem_gb",
               "peak_cpu_mem_gb", "predicted_throughput", *COMPARISON_COLUMNS, "limit_profile", "paper_system",
               "paper_measured", "measured", "runner", "weights", "device", "commit", "dirty",
               "torch_version", "transformers_version", "cuda_version", "timestamp", "machine",
               "command", "reason")
MD_COLUMNS = ("case", "status", *CONTRACT_COLUMNS, *COMPARISON_COLUMNS)
MD_HEADERS = {"prompt_len": "prompt", "gen_len": "gen", "gpu_batch_size": "gpu batch",
              "num_gpu_batches": "gpu batches", "compress_weight": "4-bit w",
              "compress_cache": "4-bit cache", "cpu_cache_compute": "CPU attn",
              "prefill_latency_s": "prefill s", "decode_throughput": "decode tok/s",
              "total_throughput": "total tok/s", "peak_gpu_mem_gb": "peak GPU GiB",
              "paper_throughput": "reference tok/s", "ratio": "ours / ref",
              "limit_throughput": "limit tok/s", "fraction_of_limit": "decode / limit",
              "binding_term": "binding term"}


def load_records(suite_dir: str) -> list[dict]:
    """The suite's raw records in suite order (then by case id)."""
    raw = os.path.join(suite_dir, "raw")
    recs = []
    for name in sorted(os.listdir(raw)):
        if name.endswith(".json"):
            with open(os.path.join(raw, name)) as f:
                recs.append(json.load(f))
    return sorted(recs, key=lambda r: (r.get("index", 1 << 30), r.get("case", "")))


def free_record_name(raw: str, case_id: str) -> str:
    """Where `raw` holds no measured record of `case_id`, `case_id`; else the next `<case>.repN`
    free of one: a measurement is never overwritten, a skipped or failed record may be. The tables
    pair each original's record with ours by machine and time, not by this name."""
    from flexgen_repro.bench.suites import REPEAT_SUFFIX, base_case

    def measured(name: str) -> bool:
        try:
            with open(os.path.join(raw, f"{name}.json")) as f:
                return json.load(f).get("status") == "ok"
        except (OSError, ValueError):
            return False
    if not measured(case_id):
        return case_id
    base, n = base_case(case_id)[0], 2
    while measured(f"{base}{REPEAT_SUFFIX}{n}"):
        n += 1
    return f"{base}{REPEAT_SUFFIX}{n}"


def _identity(rec: dict) -> str:
    """A record's content but its name: the same run under another `.repN` name is the same."""
    from flexgen_repro.bench.suites import base_case
    return json.dumps({**rec, "case": base_case(rec.get("case", ""))[0]}, sort_keys=True)


def add_records(src: str, out: str) -> list[str]:
    """Copy the records of every suite folder under `src` (`<suite>/raw/*.json`: a run folder, as
    `invoke bench --out` writes it on a GPU machine) into `out/<suite>/raw/`, each under
    free_record_name (its `case` renamed to match); a record `out` already holds (the same content
    under any repeat name) is not copied twice. Returns "suite/case" of each record copied."""
    if not os.path.isdir(src):
        raise ValueError(f"no folder {src!r}: give the folder `invoke bench --out` wrote")
    suites_in = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d, "raw")))
    if not suites_in:
        raise ValueError(f"no <suite>/raw/ folders under {src!r}: give the folder `invoke bench "
                         "--out` wrote (it holds one folder per suite)")
    added = []
    for suite in suites_in:
        raw = os.path.join(out, suite, "raw")
        os.makedirs(raw, exist_ok=True)
        held = {_identity(r) for r in load_records(os.path.join(out, suite))}
        for rec in load_records(os.path.join(src, suite)):
            key = _identity(rec)
            if key in held:
                continue
            rec = {**rec, "case": free_record_name(raw, rec["case"])}
            with open(os.path.join(raw, f"{rec['case']}.json"), "w") as f:
                json.dump(rec, f, indent=2, sort_keys=True)
                f.write("\n")
            held.add(key)
            added.append(f"{suite}/{rec['case']}")
    return added


def machine(r: dict) -> str | None:
    """The machine a record ran on, in words: its CPU, cores and memory (the GPU is `device`)."""
    hw = r.get("hardware") or {}
    if not hw.get("cpu_model"):
        return None
    cores = f", {hw['cpu_cores_logical']} cores" if hw.get("cpu_cores_logical") else ""
    ram = f", {hw['ram_gb']:g} GiB RAM" if hw.get("ram_gb") else ""
    return f"{hw['cpu_model']}{cores}{ram}"


def _value(r: dict, column: str):
    if column == "machine":
        return machine(r)
    if column == "command":
        return shlex.join(r["command"]) if isinstance(r.get("command"), list) else r.get("command")
    versions = r.get("versions") or {}
    if column.endswith("_version") and column not in r:
        return versions.get(column[: -len("_version")])
    return r.get(column)


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(round(v, 4)) if v == 0 or abs(v) >= 1e-3 else f"{v:.4g}"  # 4 decimals
    return str(v)


def _md_cell(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return str(v).replace("|", "/")


def write_csv(recs: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for r in recs:
            w.writerow([_csv_cell(_value(r, c)) for c in CSV_COLUMNS])


def _context_lines(recs: list[dict]) -> list[str]:
    def distinct(get) -> str:
        return ", ".join(sorted({str(get(r)) for r in recs if get(r) is not None})) or "-"
    return [f"- device: {distinct(lambda r: r.get('device'))}",
            f"- commit: {distinct(lambda r: r.get('commit'))}",
            f"- torch: {distinct(lambda r: (r.get('versions') or {}).get('torch'))}; "
            f"CUDA: {distinct(lambda r: (r.get('versions') or {}).get('cuda'))}; "
            f"transformers: {distinct(lambda r: (r.get('versions') or {}).get('transformers'))}",
            f"- limits from bandwidth profile: {distinct(lambda r: r.get('limit_profile'))}"]


def write_markdown(recs: list[dict], path: str, suite: str) -> None:
    lines = [f"# {suite}", "", *_context_lines(recs), "",
             "Throughput is generated tokens per second; `ours / ref` divides our total throughput "
             "by the reference figure; the limit bounds a decode step by the bytes it must move "
             "(flexgen_repro/bench/limits.py) and is compared with our decode throughput.", "",
             "| " + " | ".join(MD_HEADERS.get(c, c) for c in MD_COLUMNS) + " |",
             "|" + "---|" * len(MD_COLUMNS)]
    for r in recs:
        lines.append("| " + " | ".join(_md_cell(_value(r, c)) for c in MD_COLUMNS) + " |")
    refs = [r for r in recs if r.get("paper_throughput") is not None]
    if refs:
        lines += ["", "References:", ""]
        for r in refs:
            how = {True: "measured", False: "projected"}.get(r.get("paper_measured"), "")
            lines.append(f"- {r['case']}: {r['paper_throughput']:g} tok/s, {r.get('paper_system')}, "
                         f"{how}; {r.get('paper_source')}")
    lines += side_by_side_lines(recs)
    lines += before_after_lines(recs)
    notes = [r for r in recs if r.get("status") != "ok"]
    if notes:
        lines += ["", "Not measured:", ""]
        for r in notes:
            reason = " ".join(str(r.get("reason", "")).split())
            lines.append(f"- {r['case']} ({r['status']}): {reason[:600]}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


ORIGINAL_PREFIX = "orig-"
BASELINE_PREFIX = "base-"   # a case run from another source tree (`invoke bench --baseline DIR`)
SAME_CALL_S = 3 * 3600


def _seconds(stamp: str | None) -> float | None:
    from datetime import datetime
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else None
    except ValueError:
        return None


def _same_call(a: dict, b: dict) -> bool:
    """Two records of one machine (same hardware description) within SAME_CALL_S of each other."""
    t0, t1 = _seconds(a.get("timestamp")), _seconds(b.get("timestamp"))
    return (a.get("hardware") == b.get("hardware") and t0 is not None and t1 is not None
            and abs(t0 - t1) <= SAME_CALL_S)


def before_after(recs: list[dict]) -> list[dict]:
    """Pairs of our case `X` and `base-X` (the same case run from a baseline tree, usually the
    commit before a change) measured in one call: this tree's throughput over the baseline's."""
    ok = {r["case"]: r for r in recs if r.get("status") == "ok"}
    pairs = []
    for name, base in ok.items():
        ours = ok.get(name[len(BASELINE_PREFIX):]) if name.startswith(BASELINE_PREFIX) else None
        if ours is None or not _same_call(ours, base):
            continue
        pairs.append(dict(case=ours["case"], device=ours.get("device") or "",
                          commit=ours.get("commit") or "", baseline_commit=base.get("commit") or "",
                          ours=ours["total_throughput"], baseline=base["total_throughput"],
                          ratio=ours["total_throughput"] / base["total_throughput"]))
    return pairs


def before_after_lines(recs: list[dict]) -> list[str]:
    """The before-and-after pairs folded per case, GPU and the two commits: median and range."""
    rows = _fold(before_after(recs), ("device", "commit", "baseline_commit"), "baseline")
    if not rows:
        return []
    return _fold_table(
        rows, "This tree against a baseline tree (`base-<case>`, run just before it in the same call "
        "by `invoke bench --baseline DIR`), the median of the pairs and their range:",
        [("GPU", "device"), ("commit", "commit"), ("baseline commit", "baseline_commit")],
        ("tok/s (median)", "baseline tok/s (median)", "ratio (median)"), "baseline")


def side_by_side(recs: list[dict]) -> list[dict]:
    """Pairs of our measured case `X` (repeats included) and the original's `orig-X`: on the same
    machine (same GPU and host description) within SAME_CALL_S, each original with the latest of
    ours run before it (call_pairs); then, for display only, an original left over with ours of
    the same name measured elsewhere. Each with the ratio of the two."""
    from flexgen_repro.bench.suites import base_case
    ok = [r for r in recs if r.get("status") == "ok"]
    ours_of: dict[str, list[dict]] = {}
    origs_of: dict[str, list[dict]] = {}
    for r in ok:
        name = base_case(r["case"])[0]
        if name.startswith(ORIGINAL_PREFIX) and r.get("runner") == "original":
            origs_of.setdefault(name[len(ORIGINAL_PREFIX):], []).append(r)
        elif not name.startswith((ORIGINAL_PREFIX, BASELINE_PREFIX)):
            ours_of.setdefault(name, []).append(r)
    pairs = []
    for name, origs in origs_of.items():
        ours = ours_of.get(name, [])
        matched = call_pairs(ours, origs)
        paired = {id(r) for pair in matched for r in pair}
        by_case = {o["case"]: o for o in ours if id(o) not in paired}
        for orig in origs:
            twin = by_case.get(orig["case"][len(ORIGINAL_PREFIX):])
            if id(orig) not in paired and twin is not None:
                matched.append((twin, orig))
        for o, r in matched:
            pairs.append(dict(case=o["case"], ours=o["total_throughput"],
                              original=r["total_throughput"], device=o.get("device") or "",
                              commit=o.get("commit") or "",
                              ratio=o["total_throughput"] / r["total_throughput"],
                              reference=r.get("paper_throughput"), same_machine=_same_call(o, r),
                              original_percent=r.get("percent")))
    return sorted(pairs, key=lambda p: base_case(p["case"]))


def side_by_side_lines(recs: list[dict]) -> list[str]:
    pairs = side_by_side(recs)
    if not pairs:
        return []
    out = ["", "Side by side with the original FlexGen (`orig-<case>`, the published package run "
           "by bench/original.py on the same machine):", "",
           "| case | GPU | commit | ours tok/s | original tok/s | ours / original "
           "| original's reference tok/s | original / its reference | same machine (within 3 h) "
           "| original placed (percent) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        ref = p["reference"]
        out.append(f"| {p['case']} | {_md_cell(p['device'])} | {_md_cell(p['commit'])} "
                   f"| {_md_cell(p['ours'])} | {_md_cell(p['original'])} | "
                   f"{p['ratio']:.2f}x | {_md_cell(ref)} | "
                   f"{_md_cell(p['original'] / ref if ref else None)} | "
                   f"{'yes' if p['same_machine'] else 'no'} | {p['original_percent']} |")
    return out + pair_summary_lines(pairs)


def _fold(pairs: list[dict], keys: tuple[str, ...], other: str) -> list[dict]:
    """Pairs grouped by case (repeats folded: suites.base_case) and `keys`: how many, the median,
    min and max of their ratio, and the medians of `ours` and of `other`."""
    from flexgen_repro.bench.suites import base_case
    groups: dict[tuple, list[dict]] = {}
    for p in pairs:
        groups.setdefault((base_case(p["case"])[0], *(p[k] for k in keys)), []).append(p)
    out = []
    for key, group in groups.items():
        ratios = [p["ratio"] for p in group]
        out.append(dict(case=key[0], **dict(zip(keys, key[1:])), pairs=len(group),
                        ratio=statistics.median(ratios), ratio_min=min(ratios),
                        ratio_max=max(ratios), ours=statistics.median(p["ours"] for p in group),
                        **{other: statistics.median(p[other] for p in group)}))
    return out


def pair_summary(pairs: list[dict]) -> list[dict]:
    """Per case, GPU and commit, over its same-call pairs: how many, and the median, min and max
    of ours / original and the medians of the two throughputs. Pairs measured on another card or
    at another commit are a group of their own, never folded into one median."""
    return _fold([p for p in pairs if p["same_machine"]], ("device", "commit"), "original")


def pair_summary_lines(pairs: list[dict]) -> list[str]:
    rows = pair_summary(pairs)
    if not rows:
        return []
    return _fold_table(
        rows, "Ours / original as the median of the same-call pairs, with their range (a ratio is "
        "published from three pairs or more):", [("GPU", "device"), ("commit", "commit")],
        ("ours tok/s (median)", "original tok/s (median)", "ours / original (median)"), "original")


def _fold_table(rows: list[dict], intro: str, keys: list[tuple[str, str]],
                titles: tuple[str, str, str], other: str) -> list[str]:
    """Markdown of _fold's rows: case, the `keys` columns (title, field), the pair count, the
    medians of ours and of `other`, the median ratio and its range (`titles`: the last three
    columns' headings but the range)."""
    heads = ["case", *(title for title, _ in keys), "pairs", *titles, "min - max"]
    out = ["", intro, "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["case"], *(_md_cell(r[field]) for _, field in keys), str(r["pairs"]),
                 _md_cell(r["ours"]), _md_cell(r[other]), f"{r['ratio']:.2f}x",
                 f"{r['ratio_min']:.2f}x - {r['ratio_max']:.2f}x"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_plot(recs: list[dict], path: str, suite: str) -> None:
    """Grouped bars per case: our total throughput and the reference figure (log scale if wide)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = recs
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(shown) + 2), 4.5))
    if not shown:
        ax.text(0.5, 0.5, "no records", ha="center", va="center")
        ax.set_axis_off()
    else:
        xs = list(range(len(shown)))
        ours = [r.get("total_throughput") if r.get("status") == "ok" else 0 for r in shown]
        ref = [r.get("paper_throughput") or 0 for r in shown]
        has_ref = any(ref)
        width = 0.4 if has_ref else 0.6
        ax.bar([x - 0.2 * has_ref for x in xs], ours, width=width, label="ours")
        if has_ref:
            ax.bar([x + 0.2 for x in xs], ref, width=width, label="reference")
        for x, r in zip(xs, shown):  # y in axes fraction, so the label shows on a log scale too
            if r.get("status") != "ok":
                ax.text(x - 0.2 * has_ref, 0.02, r["status"], rotation=90, ha="center",
                        va="bottom", fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_xticks(xs, [r["case"] for r in shown], rotation=45, ha="right", fontsize=8)
        positive = [v for v in ours + ref if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
        ax.set_ylabel("total throughput (token/s)")
        ax.legend()
    devices = sorted({str(r.get("device")) for r in recs if r.get("status") == "ok"})
    versus = "vs reference" if any(r.get("paper_throughput") for r in recs) else "(no reference figures)"
    ax.set_title(f"{suite}: ours ({', '.join(devices) or 'not run'}) {versus}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_suite(suite_dir: str) -> list[str]:
    """Rebuild <suite>.csv, .md and .png from raw/; returns the paths written."""
    suite = os.path.basename(os.path.normpath(suite_dir))
    recs = load_records(suite_dir)
    paths = [os.path.join(suite_dir, f"{suite}.{ext}") for ext in ("csv", "md", "png")]
    write_csv(recs, paths[0])
    write_markdown(recs, paths[1], suite)
    write_plot(recs, paths[2], suite)
    return paths


def main(out: str, add: str | None = None) -> int:
    """Rebuild the tables and plots of every suite folder under `out` (those with raw/); `add`:
    first copy the records of that run folder in (add_records). 2 on a bad `add` folder."""
    if add:
        try:
            added = add_records(add, out)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"added {len(added)} record(s): " + (", ".join(added) or "all were there already"))
    if not os.path.isdir(out):
        print(f"error: no results folder {out!r}: run `invoke bench` first", file=sys.stderr)
        return 1
    dirs = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d, "raw")))
    if not dirs:
        print(f"error: no suite folders with raw/ under {out!r}: run `invoke bench` first",
              file=sys.stderr)
        return 1
    for d in dirs:
        print("wrote " + ", ".join(write_suite(os.path.join(out, d))))
    print("wrote " + write_table2(out))
    return 0


# The paper's Table 2 under the cap: each row names our cases (the cost model's pick) and the
# original's, as suite/case; `invoke results` folds their same-call pairs into TABLE2_SUMMARY.
TABLE2_ROWS = os.path.join(os.path.dirname(__file__), "table2_rows.csv")
TABLE2_SUMMARY = "table2-summary.md"
MIN_PAIRS_FOR_RATIO = 3


def _named_records(out: str, names: str, cache: dict) -> list[dict]:
    """The ok records of the cases `names` ("suite/case ..."), repeats included."""
    from flexgen_repro.bench.suites import base_case
    found = []
    for name in names.split():
        suite, case = name.split("/", 1)
        if suite not in cache:
            folder = os.path.join(out, suite)
            cache[suite] = load_records(folder) if os.path.isdir(os.path.join(folder, "raw")) else []
        found += [r for r in cache[suite]
                  if r.get("status") == "ok" and base_case(r.get("case", ""))[0] == case]
    return found


def call_pairs(ours: list[dict], originals: list[dict]) -> list[tuple[dict, dict]]:
    """Same-call pairs (same machine, within SAME_CALL_S), each record in one pair at most: an
    original with the latest of ours measured before it (a call runs ours, then the original's
    twin, as the suites order them), the originals taken in time order."""
    pairs, used = [], set()
    times = [_seconds(o["timestamp"]) for o in ours]
    for orig in sorted(originals, key=lambda r: _seconds(r["timestamp"])):
        t = _seconds(orig["timestamp"])
        before = [(times[i], i) for i, o in enumerate(ours)
                  if i not in used and _same_call(o, orig) and times[i] <= t]
        if before:
            i = max(before)[1]
            used.add(i)
            pairs.append((ours[i], orig))
    return pairs


def _policy_text(r: dict) -> str:
    attn = ", CPU attention" if r.get("cpu_cache_compute") else ""
    return f"`{r.get('percent')}`, {r.get('gpu_batch_size')}x{r.get('num_gpu_batches')}{attn}"


def _spread(values: list[float]) -> str:
    mid = _md_cell(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} ({_md_cell(min(values))}-{_md_cell(max(values))})"


def card_profile(device: str) -> str:
    """The shipped profile of the card that ran a record: h200 for an H200, else h100."""
    return "h200" if "H200" in (device or "").upper() else "h100"


def _predicted(rec: dict) -> float | None:
    """The cost model's throughput for a record's policy, with the shipped profile of the card
    that ran it (the model as it is now, whatever commit ran the record)."""
    from flexgen_repro.cost_model import calibrate
    from flexgen_repro.cost_model.hardware import load_profile
    try:
        profile = load_profile(card_profile(rec.get("device")))
        return calibrate.predict_record(rec, profile).throughput
    except (KeyError, ValueError):
        return None


def _by_card_and_commit(items: list, ours_of) -> dict[tuple, list]:
    """`items` grouped by the GPU and commit of ours in each (`ours_of(item)`), in order."""
    groups: dict[tuple, list] = {}
    for item in items:
        o = ours_of(item)
        groups.setdefault((o.get("device") or "", o.get("commit") or ""), []).append(item)
    return groups


def table2_rows(out: str) -> list[dict]:
    """One entry per row of TABLE2_ROWS and GPU and commit of ours: the same-call pairs of our
    cases and the original's, folded (medians and ranges; a ratio only from MIN_PAIRS_FOR_RATIO
    pairs); where no original ran beside ours, ours alone (no pair); a row never run says so."""
    with open(TABLE2_ROWS, newline="") as f:
        spec = list(csv.DictReader(f))
    cache: dict = {}
    rows = []
    for s in spec:
        mine = _named_records(out, s["ours"], cache)
        pairs = call_pairs(mine, _named_records(out, s["original"], cache))
        groups = _by_card_and_commit(pairs, lambda pair: pair[0])
        base = dict(model=s["model"], compression=s["compression"], note=s["note"],
                    ours_cases=s["ours"], original_cases=s["original"])
        alone = _by_card_and_commit(mine if not groups else [], lambda o: o)
        if not groups and not alone:
            rows.append(dict(base, pairs=0))
        for (device, commit), ours in alone.items():
            rows.append(dict(base, pairs=0, device=device, commit=commit,
                             predicted=_predicted(ours[-1]), ours_policy=_policy_text(ours[-1]),
                             ours=[o["total_throughput"] for o in ours]))
        for (device, commit), group in groups.items():
            ours, orig = [o for o, _ in group], [r for _, r in group]
            ratios = [o["total_throughput"] / r["total_throughput"] for o, r in group]
            fractions = [o["fraction_of_limit"] for o in ours if o.get("fraction_of_limit")]
            rows.append(dict(
                base, pairs=len(group), device=device, commit=commit,
                predicted=_predicted(ours[-1]),
                ours_policy=_policy_text(ours[-1]), original_policy=_policy_text(orig[-1]),
                ours=[o["total_throughput"] for o in ours],
                original=[r["total_throughput"] for r in orig], ratios=ratios,
                fraction_of_limit=statistics.median(fractions) if fractions else None,
                binding=ours[-1].get("binding_term") or ""))
    return rows


def _vs_predicted(r: dict) -> str:
    mid = statistics.median(r["ours"])
    return f"{_md_cell(r['predicted'])} ({100 * (r['predicted'] / mid - 1):+.0f}%)" \
        if r["predicted"] else "-"


def table2_lines(rows: list[dict]) -> list[str]:
    heads = ["model", "4-bit", "GPU", "ours: commit", "ours: policy", "ours tok/s",
             "predicted (the card's profile)", "decode / limit (binding)", "original: policy",
             "original tok/s", "pairs", "ours / original", "the original's side"]
    out = ["# The paper's Table 2 under a 16 GiB GPU cap", "",
           "Made by `invoke results` from the records under results/ (the rows and their cases: "
           "flexgen_repro/bench/table2_rows.csv). Ours is the cost model's pick; each pair is ours "
           "and the original's run after it on the same machine within 3 hours (the latest of ours "
           "before each original). "
           f"Throughput is the median of the pairs (their range in brackets); a ratio is given "
           f"from {MIN_PAIRS_FOR_RATIO} pairs or more. Predicted: the cost model as it is now "
           "(the shipped profile of the card that ran ours: h200 on an H200, else h100) for ours' "
           "policy, against ours' median. Ours alone: no original ran beside it.", "",
           "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        if "ours" not in r:
            cells = [r["model"], r["compression"], "-", "-", r["ours_cases"], "not measured", "-",
                     "-", r["original_cases"], "-", "0", "-", r["note"]]
        elif not r["pairs"]:
            cells = [r["model"], r["compression"], _md_cell(r["device"]), r["commit"],
                     r["ours_policy"], _spread(r["ours"]), _vs_predicted(r), "-",
                     r["original_cases"], "-", "0", "ours alone", r["note"]]
        else:
            limit = (f"{_md_cell(r['fraction_of_limit'])} ({r['binding']})"
                     if r["fraction_of_limit"] else "-")
            ratio = (f"{statistics.median(r['ratios']):.2f}x ({min(r['ratios']):.2f}-"
                     f"{max(r['ratios']):.2f}x)" if r["pairs"] >= MIN_PAIRS_FOR_RATIO
                     else f"fewer than {MIN_PAIRS_FOR_RATIO} pairs")
            cells = [r["model"], r["compression"], _md_cell(r["device"]), r["commit"],
                     r["ours_policy"], _spread(r["ours"]), _vs_predicted(r), limit,
                     r["original_policy"], _spread(r["original"]), str(r["pairs"]), ratio, r["note"]]
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_table2(out: str) -> str:
    path = os.path.join(out, TABLE2_SUMMARY)
    with open(path, "w") as f:
        f.write("\n".join(table2_lines(table2_rows(out))) + "\n")
    return path
