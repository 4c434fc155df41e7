"""Reading torch checkpoints (the zip format torch.save has written since torch 1.6) without torch.load.

The pickle is read with an allow-list unpickler that never imports or runs code named in the file:
classes it does not know (OmegaConf configs, argparse namespaces, metaseq enums, ...) become inert
placeholders, so metaseq's shards open without metaseq, fairscale or omegaconf installed and without
`weights_only=False`. Tensors become `TensorRef` handles; their bytes are read on demand with plain
file reads into the caller's buffer, so opening a 350 MB shard costs only its pickle, and memory holds
only what is read (no memory map whose touched pages would count against the process).
"""
from __future__ import annotations

import builtins
import collections
import copyreg
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexgen_repro.weights.folder import WeightsError

# torch storage class / dtype name -> element type ("bfloat16" is read as raw 16-bit words)
_STORAGE_DTYPES = {
    "HalfStorage": "float16", "FloatStorage": "float32", "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}
_TORCH_DTYPES = {
    "float16": "float16", "half": "float16", "float32": "float32", "float": "float32",
    "float64": "float64", "double": "float64", "bfloat16": "bfloat16", "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "int8": "int8",
    "uint8": "uint8", "bool": "bool",
}
_ITEMSIZE = {"bfloat16": 2}
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                  "bytearray", "bool", "complex", "slice", "range", "object"}


def itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor inside a checkpoint file, not yet read."""
    path: str
    data_offset: int       # byte offset of the storage's first element in the file
    dtype: str             # element type name ("float16", "bfloat16", ...)
    offset: int            # element offset of the tensor in its storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def is_contiguous(self) -> bool:
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        return all(s == e for s, e, n in zip(self.stride, reversed(expected), self.shape) if n > 1)

    def read_into(self, out: np.ndarray, start: int = 0, stop: int | None = None) -> None:
        """Elements [start, stop) of this (contiguous) tensor, in C order, into the 1-D array `out`,
        converting to out's dtype."""
        stop = self.numel if stop is None else stop
        if not self.is_contiguous():
            raise WeightsError(f"{self.path}: a non-contiguous tensor of shape {self.shape} cannot be "
                               "read in slices")
        if out.ndim != 1 or out.size != stop - start or not 0 <= start <= stop <= self.numel:
            raise ValueError(f"bad read of [{start}, {stop}) into {out.shape} from a tensor of {self.numel}")
        size = itemsize(self.dtype)
        first = self.data_offset + (self.offset + start) * size
        if self.dtype != "bfloat16" and out.dtype == np.dtype(self.dtype) and out.flags.c_contiguous:
            _read_exact(self.path, first, memoryview(out).cast("B"))
            return
        step = max(1, (32 << 20) // size)  # convert in 32 MiB slices
        for lo in range(0, out.size, step):
            hi = min(out.size, lo + step)
            raw = np.empty((hi - lo) * size, np.uint8)
            _read_exact(self.path, first + lo * size, memoryview(raw))
            out[lo:hi] = _decode(raw, self.dtype)

    def array(self) -> np.ndarray:
        """The whole tensor (bfloat16 comes back as float32)."""
        dtype = "float32" if self.dtype == "bfloat16" else self.dtype
        if self.is_contiguous():
            out = np.empty(self.numel, dtype)
            self.read_into(out)
            return out.reshape(self.shape)
        extent = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        span = TensorRef(self.path, self.data_offset, self.dtype, self.offset, (extent,), (1,)).array()
        step = span.itemsize
        return np.lib.stride_tricks.as_strided(span, self.shape, tuple(s * step for s in self.stride)).copy()


def _decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.dtype(dtype))


def _read_exact(path: str, offset: int, buf: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                raise WeightsError(f"{path} is truncated (wanted {len(buf)} bytes at {offset}); "
                                   "download it again")
            done += n


class _Inert:
    """Stands in for a class the checkpoint names but we do not import; keeps what it was given."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, {}

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.items[len(self.items)] = value

    def extend(self, values):
        for value in values:
            self.append(value)

    def add(self, value):
        self.append(value)


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    path: str
    dtype: str
    data_offset: int
    numel: int


def _tensor(storage: _Storage, offset, size, stride, *rest, dtype: str | None = None) -> TensorRef:
    return TensorRef(storage.path, storage.data_offset, dtype or storage.dtype, int(offset),
                     tuple(size), tuple(stride))


def _tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest) -> TensorRef:
    return _tensor(storage, offset, size, stride, dtype=dtype.dtype if isinstance(dtype, _StorageType) else None)


def _reconstruct(cls, base, state):
    if isinstance(cls, type) and issubclass(cls, _Inert):
        obj = cls()
        obj.state = state
        return obj
    return copyreg._reconstructor(cls, base, state)


_TORCH_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _tensor_v3,
    ("torch._utils", "_rebuild_parameter"): lambda data, *rest: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *rest: data,
    ("torch._tensor", "_rebuild_from_type_v2"): lambda func, new_type, args, state: func(*args),
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("copyreg", "_reconstructor"): _reconstruct,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, path: str, prefix: str):
        super().__init__(file)
        self._zf, self._path, self._prefix = zf, path, prefix
        self._offsets: dict[str, int] = {}  # storage key -> data offset (a storage may back many tensors)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TORCH_FUNCTIONS:
            return _TORCH_FUNCTIONS[(module, name)]
        if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _StorageType(_TORCH_DTYPES[name])
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        return type(name, (_Inert,), {"__module__": module})

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise WeightsError(f"{self._path}: unsupported persistent record {kind!r}")
        if key not in self._offsets:
            info = self._zf.getinfo(f"{self._prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise WeightsError(f"{self._path}: storage {key} is compressed; torch never writes that")
            self._offsets[key] = _member_offset(self._path, info)
        return _Storage(self._path, storage_type.dtype, self._offsets[key], int(numel))


def _member_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored zip member's data: after its local header, name and extra field."""
    header = bytearray(30)
    _read_exact(path, info.header_offset, memoryview(header))
    if header[:4] != b"PK\x03\x04":
        raise WeightsError(f"{path}: damaged zip entry {info.filename}; download the file again")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def load(path: str) -> Any:
    """The checkpoint's object tree, with TensorRef in place of every tensor (no tensor data is read)."""
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path} is not a torch zip checkpoint (torch >= 1.6 format); it is truncated, "
                           "damaged or in the legacy format: download it again")
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][:-len("data.pkl")]
        if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").strip() != b"little":
            raise WeightsError(f"{path} was saved on a big-endian machine; not supported")
        with zf.open(pickles[0]) as f:
            return _Unpickler(f, zf, os.path.abspath(path), prefix).load()
