"""The text job's files: input records (JSONL or one prompt per line), and the output JSONL, which
is also the job's checkpoint: appended, flushed and fsynced as records finish; on resume a torn
last line is cut away and the ids already there are skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from flexgen_repro.text.model import TextJobError

OWN_FIELDS = ("id", "prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason")


@dataclass(frozen=True)
class Record:
    """One input record: its line (1-based), id (given, else the line number), prompt, and the
    other fields, passed through to the output."""
    line: int
    id: object
    prompt: str
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value) -> str:
    """An id as one comparable string (1 and "1" stay different)."""
    return json.dumps(value, sort_keys=True)


def read_records(path: str) -> Iterator[Record]:
    """The records of a `.txt` file (one prompt per line) or a JSONL file, blank lines skipped."""
    as_text = path.endswith(".txt")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            text = line.rstrip("\n").rstrip("\r")
            if not text.strip():
                continue
            yield Record(n, n, text) if as_text else _parse(text, n, path)


def _parse(text: str, n: int, path: str) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TextJobError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}): "
                           "each line must be one object like {\"prompt\": \"...\"}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise TextJobError(f"{path} line {n} has no string \"prompt\": each line must be one object "
                           "like {\"prompt\": \"...\", \"id\": ...}")
    rid = obj.get("id", n)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise TextJobError(f"{path} line {n}: \"id\" must be a string or an integer, got {rid!r}")
    extra = {k: v for k, v in obj.items() if k not in ("id", "prompt")}
    return Record(n, rid, obj["prompt"], extra)


def spool_stdin(folder: str) -> str:
    """Standard input copied to a temporary JSONL file in `folder` (read twice: checked, then run)."""
    fd, path = tempfile.mkstemp(prefix=".generate-stdin-", suffix=".jsonl", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        shutil.copyfileobj(sys.stdin, out)
    return path


def check_output(path: str, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing output unless told how (before any work is done)."""
    if resume and overwrite:
        raise TextJobError("pass --resume or --overwrite, not both")
    if os.path.exists(path) and not (resume or overwrite):
        raise TextJobError(f"{path} exists: pass --resume to continue it, or --overwrite to start over")


def written_ids(path: str) -> list[str]:
    """Keys of the records already in an output file (in order), after cutting away a torn last
    line (the part after the final newline: a run killed mid-write). A bad line elsewhere is an
    error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    *complete, tail = data.split(b"\n")
    keys = []
    for n, raw in enumerate(complete, start=1):
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict) or "id" not in obj:
            raise TextJobError(f"{path} line {n} is not a record this job wrote; "
                               "pass --overwrite to start over")
        keys.append(id_key(obj["id"]))
    if tail:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
            f.flush()
            os.fsync(f.fileno())
    return keys


class OutputWriter:
    """Appends output records, flushed and fsynced after each batch of lines."""

    def __init__(self, path: str, overwrite: bool):
        self.f = open(path, "w" if overwrite else "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def output_record(rec: Record, completion) -> dict:
    """The output line of one input record: our fields, then the passed-through ones."""
    out = dict(id=rec.id, prompt=rec.prompt, completion=completion.text,
               prompt_tokens=completion.prompt_tokens, completion_tokens=len(completion.token_ids),
               finish_reason=completion.finish_reason)
    out.update({k: v for k, v in rec.extra.items() if k not in OWN_FIELDS})
    return out
