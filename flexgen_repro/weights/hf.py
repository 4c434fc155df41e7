"""Hugging Face checkpoints (OPT, and the Llama family: Llama, Mistral, Qwen2) into the weight
folder: find (or download) the weight files and convert them tensor by tensor to fp16, never
holding more than one tensor (plus one memory-mapped shard).

Accepted: `model.safetensors`, sharded `model-*.safetensors` with `model.safetensors.index.json`,
`pytorch_model.bin`, sharded `pytorch_model-*.bin` with `pytorch_model.bin.index.json`; safetensors is
preferred when a folder holds both. Keys may carry the `model.` prefix or not; a tied `lm_head` is
not stored (an untied one is, as `lm_head.weight`).
"""
from __future__ import annotations

import glob
import json
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from flexgen_repro.weights.folder import WeightFolder, WeightsError, check_free_space, gib, progress
from flexgen_repro.weights.layout import expected_tensors, hf_key_to_file_name

_FORMATS = (("safetensors", "model.safetensors", "model.safetensors.index.json", "*.safetensors"),
            ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"))
SAFETENSORS_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def checkpoint_files(folder: str) -> tuple[str, list[str]]:
    """("safetensors" | "bin", weight files) of a checkpoint folder; names what is missing."""
    for kind, single, index, pattern in _FORMATS:
        index_path = os.path.join(folder, index)
        if os.path.exists(index_path):
            with open(index_path) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
            if missing:
                raise WeightsError(f"{folder}: {index} lists files that are not there: {', '.join(missing)}; "
                                   "download the checkpoint again")
            return kind, [os.path.join(folder, n) for n in names]
        if os.path.exists(os.path.join(folder, single)):
            return kind, [os.path.join(folder, single)]
        found = sorted(glob.glob(os.path.join(folder, pattern)))
        if found:
            return kind, found
    raise WeightsError(f"{folder} holds no model.safetensors, sharded safetensors with an index, "
                       "pytorch_model.bin or sharded .bin files")


@contextmanager
def _open_file(kind: str, path: str) -> Iterator[dict[str, tuple[tuple[int, ...], Callable]]]:
    """key -> (shape, load) for one weight file; nothing is read until load() is called."""
    import torch
    if kind == "safetensors":
        from safetensors import safe_open
        with safe_open(path, framework="pt") as st:
            yield {k: (tuple(st.get_slice(k).get_shape()), lambda k=k: st.get_tensor(k)) for k in st.keys()}
        return
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (pre-zip) format cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    try:
        yield {k: (tuple(v.shape), lambda v=v: v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    finally:
        del sd


def _to_fp16(tensor) -> np.ndarray:
    import torch
    return tensor.detach().to(torch.float16).contiguous().numpy()


def _scan(kind: str, files: list[str], expected: dict, keep_lm_head: bool
          ) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Folder name -> (file, key) of every needed tensor, after checking shapes (headers only)."""
    where, problems = {}, []
    for path in files:
        with _open_file(kind, path) as entries:
            for key, (shape, _) in entries.items():
                name = hf_key_to_file_name(key, keep_lm_head)
                if name not in expected:
                    continue
                if shape != expected[name]:
                    problems.append(f"{key}: checkpoint {shape}, expected {expected[name]}")
                where[name] = (path, key)
    if problems:
        raise WeightsError("the checkpoint's shapes do not match the model:\n  " + "\n  ".join(problems[:20]))
    return where, [n for n in expected if n not in where]


def convert_hf_folder(src: str, out_dir: str, config) -> str:
    """Convert a local Hugging Face checkpoint folder of `config`'s family into `out_dir`
    (resumable). Returns out_dir."""
    kind, files = checkpoint_files(src)
    expected = expected_tensors(config)
    where, missing = _scan(kind, files, expected, keep_lm_head=config.family != "opt")
    if missing:
        raise WeightsError(f"{src} lacks {len(missing)} tensors of {config.name}: {', '.join(missing[:10])}")
    folder = WeightFolder(out_dir, expected, model=config.name, source=os.path.abspath(src))
    folder.check_disk()
    todo = set(folder.pending())
    print(f"{config.name}: {len(files)} {kind} file(s) -> {folder.folder}: {len(todo)} of {len(expected)} "
          f"tensors to write ({gib(folder.pending_bytes())})")
    with progress(folder.pending_bytes(), "converting tensors") as bar:
        for path in files:
            names = [n for n in expected if n in todo and where[n][0] == path]
            if not names:
                continue
            with _open_file(kind, path) as entries:
                for name in names:
                    arr = _to_fp16(entries[where[name][1]][1]())
                    folder.write(name, arr)
                    bar.update(arr.nbytes)
                    del arr
    return folder.finish()


HUB_REPOS = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-70b": "meta-llama/Llama-2-70b-hf",
             "mistral-7b": "mistralai/Mistral-7B-v0.1"}


def hub_repo_id(name: str) -> str:
    return HUB_REPOS.get(name, f"facebook/{name}")


def _offline_errors() -> tuple[type, ...]:
    from huggingface_hub import errors
    kinds: list[type] = [errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, ConnectionError,
                         TimeoutError]
    try:
        import httpx
        kinds.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests
        kinds.append(requests.exceptions.ConnectionError)
    except ImportError:
        pass
    return tuple(kinds)


def download(config) -> str:
    """Fetch a released checkpoint into the Hugging Face cache (safetensors, else .bin); return its folder."""
    import huggingface_hub
    from huggingface_hub import constants, errors
    repo = hub_repo_id(config.name)
    check_free_space(constants.HF_HUB_CACHE, config.num_params() * 2,
                     f"downloading {repo} into the Hugging Face cache (fp16 estimate; set HF_HOME to move it)")
    print(f"downloading {repo} (about {gib(config.num_params() * 2)}) into {constants.HF_HUB_CACHE}")
    try:
        folder = huggingface_hub.snapshot_download(repo, allow_patterns=SAFETENSORS_PATTERNS)
        if not glob.glob(os.path.join(folder, "*.safetensors")):
            folder = huggingface_hub.snapshot_download(repo, allow_patterns=BIN_PATTERNS)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise WeightsError(f"{repo} is not available on the Hugging Face hub ({type(e).__name__}); "
                           "pass --source DIR with a local checkpoint folder") from None
    except _offline_errors() as e:
        raise WeightsError(f"cannot download {repo}: no network or offline mode ({type(e).__name__}). "
                           "Pass --source DIR with a local Hugging Face checkpoint folder of "
                           f"{config.name} (config.json plus model.safetensors or pytorch_model*.bin)") from None
    return folder
