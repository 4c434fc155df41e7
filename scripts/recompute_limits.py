"""Recompute the limit columns of raw run records in place with the current limits code and a
named bandwidth profile (the run's own `hardware_local.json`, from `invoke profile-hardware` on
the machine that ran it, or a built-in one such as `h100-reference`), and say so in
`limit_note`. For records made before a change to
bench/limits.py. Usage:
python3 scripts/recompute_limits.py --profile hardware_local.json \
    --note "the run machine's profile" results/h100-large/raw/66b-c-32x2.json ..."""
import argparse
import json
import os
import sys

from flexgen_repro.bench import limits


def recompute(record: dict, bw: limits.Bandwidths, note: str) -> dict:
    lim = limits.record_limit(record, bw)
    decode = record.get("decode_throughput")
    record.update(limit_throughput=lim.throughput, binding_term=lim.binding, limit_terms=lim.terms,
                  limit_profile=bw.name,
                  fraction_of_limit=decode / lim.throughput if decode and lim.throughput else None,
                  limit_note=f"recomputed after the run (bench/limits.py: terms on one resource "
                             f"add up) with {note}")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", required=True,
                   help=f"a profile JSON (profile-hardware's output) or one of {sorted(limits.BUILTIN)}")
    p.add_argument("--note", required=True, help="which profile, for the record's limit_note")
    p.add_argument("records", nargs="+")
    args = p.parse_args(argv)
    bw = limits.load_bandwidths(args.profile if args.profile in limits.BUILTIN
                                else os.path.abspath(args.profile))
    if bw is None:
        print(f"error: {args.profile} is a host-backed profile: no link to bound", file=sys.stderr)
        return 2
    for path in args.records:
        with open(path) as f:
            record = json.load(f)
        if record.get("status", "ok") != "ok":
            print(f"{path}: status {record.get('status')}, left as it is")
            continue
        recompute(record, bw, f"{args.note} ({os.path.basename(args.profile)})")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        print(f"{path}: limit {record['limit_throughput']:.2f} tok/s ({record['binding_term']}), "
              f"decode at {100 * (record['fraction_of_limit'] or 0):.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
