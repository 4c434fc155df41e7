"""Checking a weight folder: every expected tensor present with the right shape (headers only: fast,
what the runtime calls before loading), and, for `invoke verify-weights`, the manifest's records and
checksums too. Folders written by the original FlexGen have no manifest; their shapes are still checked.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from flexgen_repro.config import LLAMA_PRESETS, OPT_PRESETS
from flexgen_repro.weights.folder import (MANIFEST, PARTIAL, TMP_MARK, file_checksum, load_manifest, progress,
                                          read_header)
from flexgen_repro.weights.layout import expected_tensors, weight_dir

_READABLE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def tensor_problems(config, folder: str) -> list[str]:
    """One line per missing, misshapen, truncated or wrongly typed tensor file (reads headers only)."""
    if not os.path.isdir(folder):
        return [f"no weight folder at {folder}"]
    problems = []
    for name, shape in expected_tensors(config).items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            problems.append(f"missing: {name}")
            continue
        try:
            header = read_header(path)
        except (OSError, ValueError) as e:
            problems.append(f"unreadable: {name} ({e})")
            continue
        if header.shape != tuple(shape):
            problems.append(f"wrong shape: {name} is {header.shape}, {config.name} needs {tuple(shape)}")
        elif header.dtype not in _READABLE_DTYPES:
            problems.append(f"wrong dtype: {name} is {header.dtype}, expected float16")
        elif header.truncated:
            problems.append(f"truncated: {name} ({header.file_size} bytes, needs "
                            f"{header.data_offset + header.data_bytes})")
    return problems


def fix_hint(config, folder: str) -> str:
    root = os.path.dirname(os.path.normpath(folder))
    known = config.name in OPT_PRESETS or config.name in LLAMA_PRESETS
    model = config.name if known else "<its checkpoint folder>"
    source = " --source DIR_WITH_THE_992_SHARDS" if config.name == "opt-175b" else ""
    return (f"rerun `invoke prepare-weights --model {model} --path {root}{source}` "
            "(it resumes and rewrites bad files)")


def check_folder(config, folder: str) -> None:
    """Raise ValueError naming every missing or misshapen tensor of `folder` and how to fix it."""
    problems = tensor_problems(config, folder)
    if problems:
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        shown = "\n  ".join(problems[:40]) + more
        raise ValueError(f"weight folder {folder} is not usable for {config.name} ({len(problems)} problems):\n"
                         f"  {shown}\nFix: {fix_hint(config, folder)}")


def manifest_problems(config, folder: str, checksums: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes) from the manifest: records that disagree with the files, and bad checksums."""
    notes, problems = [], []
    if os.path.exists(os.path.join(folder, PARTIAL)):
        problems.append("a conversion into this folder did not finish (.manifest.partial.jsonl is there)")
    manifest = load_manifest(folder)
    if manifest is None:
        notes.append(f"no {MANIFEST} (a folder not written by prepare-weights?): shapes checked, checksums not")
        return problems, notes
    if manifest.get("model") != config.name:
        problems.append(f"{MANIFEST} describes {manifest.get('model')!r}, not {config.name}")
    records = manifest.get("tensors", {})
    expected = expected_tensors(config)
    problems += [f"not in {MANIFEST}: {n}" for n in expected if n not in records]
    headers = {}
    for name in (n for n in expected if n in records):
        try:
            headers[name] = read_header(os.path.join(folder, name))
        except (OSError, ValueError):
            continue  # reported by tensor_problems
    for name, header in headers.items():
        if list(header.shape) != list(records[name]["shape"]) or header.dtype.name != records[name]["dtype"]:
            problems.append(f"differs from {MANIFEST}: {name} is {header.dtype} {header.shape}, recorded "
                            f"{records[name]['dtype']} {tuple(records[name]['shape'])}")
    if checksums:
        with progress(sum(h.data_bytes for h in headers.values()), "checking checksums") as bar:
            for name in headers:
                if file_checksum(os.path.join(folder, name), bar) != records[name]["blake2b"]:
                    problems.append(f"checksum mismatch: {name} (the file changed or is damaged)")
    extra = sorted(e for e in os.listdir(folder)
                   if e not in expected and e not in (MANIFEST, PARTIAL) and TMP_MARK not in e)
    if extra:
        notes.append(f"{len(extra)} other files in the folder (ignored): {', '.join(extra[:5])}")
    return problems, notes


def verify_folder(config, folder: str, checksums: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes) of a weight folder: shapes, then manifest and checksums."""
    problems = tensor_problems(config, folder)
    if not os.path.isdir(folder):
        return problems, []
    more, notes = manifest_problems(config, folder, checksums)
    return problems + more, notes


def main(model: str, path: str = "~/opt_weights") -> int:
    """Entry point of `invoke verify-weights`: 0 when the folder is complete and intact, else 1."""
    from flexgen_repro.weights.prepare import model_config
    try:
        config = model_config(model)
    except ValueError as e:
        print(f"verify-weights: {e}", file=sys.stderr)
        return 2
    folder = weight_dir(path, config.name)
    problems, notes = verify_folder(config, folder)
    for note in notes:
        print(f"note: {note}")
    if problems:
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        print(f"{folder}: {len(problems)} problems. Fix: {fix_hint(config, folder)}", file=sys.stderr)
        return 1
    print(f"{folder}: all {len(expected_tensors(config))} tensors of {config.name} present and intact")
    return 0
