"""The weight folder on disk: one np.save file per tensor, named exactly after the tensor (no `.npy`
suffix, as the original FlexGen writes them), written atomically; its manifest; resumable writing.

A tensor file only ever appears complete: it is written to a hidden temporary name, synced, then
renamed. Each finished tensor is appended to `.manifest.partial.jsonl`; a rerun trusts a file only if it
is recorded there (or in `manifest.json`) for the same source and its header and size still match,
and rewrites the rest.
`manifest.json` (name, shape, dtype, blake2b of the data bytes) is written last.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from tqdm import tqdm

MANIFEST = "manifest.json"
PARTIAL = ".manifest.partial.jsonl"
TMP_MARK = ".tmp-"
MANIFEST_FORMAT = 1
GIB = 1 << 30


class WeightsError(ValueError):
    """A problem with weights or their source that the user fixes; the message says how."""


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int
    file_size: int

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def truncated(self) -> bool:
        return self.file_size < self.data_offset + self.data_bytes


def read_header(path: str) -> NpyHeader:
    """Shape, dtype and data offset of an np.save file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return NpyHeader(tuple(shape), np.dtype(dtype), fortran, f.tell(), os.fstat(f.fileno()).st_size)


def gib(nbytes: float) -> str:
    """A byte count for people: '1.23 GiB', '4.5 MiB'."""
    if nbytes >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


def progress(total: int, desc: str, unit: str = "B") -> tqdm:
    """A progress bar with rate and time left; bytes are shown scaled (MB/s, GB)."""
    scaled = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024 if scaled else 1000,
                mininterval=1.0, smoothing=0.05, dynamic_ncols=True)


def check_free_space(path: str, need: int, what: str) -> None:
    """Raise WeightsError unless the filesystem holding `path` has `need` bytes free."""
    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise WeightsError(f"not enough disk space at {probe}: {what} needs {gib(need)}, only {gib(free)} "
                           "is free. Free some space, or pass --path on a larger drive")


def _write_data(f, arr: np.ndarray, digest) -> None:
    """Write arr's C-order bytes in 64 MiB slices (no full copy), hashing as they go."""
    flat = arr.reshape(-1)
    step = max(1, (64 << 20) // max(1, arr.itemsize))
    for start in range(0, flat.size, step):
        chunk = memoryview(np.ascontiguousarray(flat[start:start + step])).cast("B")
        digest.update(chunk)
        f.write(chunk)


def write_npy(path: str, arr: np.ndarray) -> str:
    """np.save `arr` to exactly `path` (no suffix added) atomically; return blake2b of its data bytes."""
    arr = np.ascontiguousarray(arr)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}")
    digest = hashlib.blake2b(digest_size=32)
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
            _write_data(f, arr, digest)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return digest.hexdigest()


def file_checksum(path: str, bar: tqdm | None = None) -> str:
    """blake2b of an np.save file's data bytes (the same digest write_npy returns), read in 16 MiB blocks."""
    header = read_header(path)
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        while block := f.read(16 << 20):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    return digest.hexdigest()


def load_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_partial(folder: str) -> dict[str, dict]:
    """Records of tensors finished by an interrupted run (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    path = os.path.join(folder, PARTIAL)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    records[rec["name"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    return records


class WeightFolder:
    """Writes one model's tensors into its folder; skips tensors a previous run finished."""

    def __init__(self, folder: str, expected: Mapping[str, tuple[int, ...]], *, model: str, source: str):
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.expected = {name: tuple(shape) for name, shape in expected.items()}
        self.model, self.source = model, source
        os.makedirs(self.folder, exist_ok=True)
        self._remove_stale_temporaries()
        # trust only what this same source produced: another checkpoint may have the same shapes
        manifest = load_manifest(self.folder) or {}
        known = dict(manifest.get("tensors", {})) if manifest.get("source") == source else {}
        known.update({n: r for n, r in load_partial(self.folder).items() if r.get("source") == source})
        self.records = {n: r for n, r in known.items() if n in self.expected and self._intact(n, r)}

    def _remove_stale_temporaries(self) -> None:
        for entry in os.listdir(self.folder):
            if entry.startswith(".") and TMP_MARK in entry:
                os.remove(os.path.join(self.folder, entry))

    def _intact(self, name: str, record: Mapping) -> bool:
        path = os.path.join(self.folder, name)
        try:
            header = read_header(path)
        except (OSError, ValueError):
            return False
        return (header.shape == self.expected[name] == tuple(record.get("shape", ()))
                and header.dtype == np.float16 and not header.truncated and not header.fortran_order)

    def done(self, name: str) -> bool:
        return name in self.records

    def pending(self) -> list[str]:
        return [name for name in self.expected if name not in self.records]

    def pending_bytes(self) -> int:
        return sum(2 * int(np.prod(self.expected[n], dtype=np.int64)) for n in self.pending())

    def largest_bytes(self) -> int:
        return max((2 * int(np.prod(s, dtype=np.int64)) for s in self.expected.values()), default=0)

    def check_disk(self) -> None:
        """Enough free space for the tensors still to write plus one temporary tensor."""
        need = self.pending_bytes() + self.largest_bytes() + (16 << 20)
        check_free_space(self.folder, need, f"the weight folder ({len(self.pending())} tensors to write, "
                                            "plus one tensor's temporary file)")

    def write(self, name: str, arr: np.ndarray) -> None:
        """Write one finished fp16 tensor and record it."""
        if name not in self.expected:
            raise KeyError(f"{name} is not a tensor of {self.model}")
        if tuple(arr.shape) != self.expected[name] or arr.dtype != np.float16:
            raise WeightsError(f"{name}: got {arr.dtype} {tuple(arr.shape)}, expected float16 "
                               f"{self.expected[name]} for {self.model}")
        checksum = write_npy(os.path.join(self.folder, name), arr)
        record = {"name": name, "shape": list(arr.shape), "dtype": "float16", "blake2b": checksum}
        with open(os.path.join(self.folder, PARTIAL), "a") as f:
            f.write(json.dumps(dict(record, source=self.source)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[name] = record

    def finish(self) -> str:
        """Write manifest.json once every expected tensor is in place; return the folder."""
        missing = self.pending()
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise WeightsError(f"{self.folder}: the source lacks {len(missing)} tensors of {self.model}: {shown}")
        manifest = {"format": MANIFEST_FORMAT, "model": self.model, "source": self.source,
                    "checksum": "blake2b-256 of the C-order data bytes after the np.save header",
                    "tensors": {n: {k: v for k, v in self.records[n].items() if k not in ("name", "source")}
                                for n in self.expected}}
        tmp = os.path.join(self.folder, f".{MANIFEST}{TMP_MARK}{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.folder, MANIFEST))
        partial = os.path.join(self.folder, PARTIAL)
        if os.path.exists(partial):
            os.remove(partial)
        return self.folder
