"""Meta's metaseq OPT checkpoints into the weight folder, streamed one tensor at a time.

Sources: the 992-file release of OPT-175B (`checkpoint_last-model_part-<K>-shard<N>.pt`: 8 Megatron
parts x 124 FSDP ranks), metaseq's per-part `reshard-model_part-<K>.pt` files, or one consolidated `.pt`.
First every file's pickle is read (no tensor data) to index where each named parameter of each part
lies: FSDP un-flattening is only arithmetic on element offsets (strip each rank's padding, concatenate,
split by `numels`). Then each output tensor is read straight from those byte ranges, glued across the
parts (Megatron: qkv split k, v, q; column-parallel on dim 0; row-parallel on dim 1; the rest
replicated), written and dropped. Peak memory is about twice the largest tensor, whatever the model.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field

import numpy as np

from flexgen_repro.config import OptConfig
from flexgen_repro.weights import torchzip
from flexgen_repro.weights.folder import WeightFolder, WeightsError, gib, progress
from flexgen_repro.weights.layout import expected_tensors, hf_key_to_file_name
from flexgen_repro.weights.torchzip import TensorRef

SHARD_RE = re.compile(r"^checkpoint_last-model_part-(\d+)-shard(\d+)\.pt$")
RESHARD_RE = re.compile(r"^reshard-model_part-(\d+)\.pt$")
_WRAPPERS = ("_fsdp_wrapped_module.", "_fpw_module.", "_checkpoint_wrapped_module.")


@dataclass(slots=True)
class Param:
    """One named parameter of one model part: runs of elements in one or more files, in order."""
    name: str
    shape: tuple[int, ...]
    pieces: list[tuple[TensorRef, int, int]] = field(default_factory=list)  # (tensor, start, stop)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def read(self, out: np.ndarray, start: int = 0) -> None:
        """Elements [start, start + out.size) of this parameter (C order) into the 1-D array `out`."""
        pos, done = 0, 0
        for ref, lo, hi in self.pieces:
            n = hi - lo
            a, b = max(start + done, pos), min(start + out.size, pos + n)
            if a < b:
                ref.read_into(out[done:done + b - a], lo + a - pos, lo + b - pos)
                done += b - a
            pos += n
            if done == out.size:
                return
        if done != out.size:
            raise WeightsError(f"{self.name}: the shards hold fewer elements than its shape {self.shape}")


def find_shards(src_dir: str, parts: int | None = None, shards: int | None = None) -> list[list[str]]:
    """The release's files as [part][rank] paths; names every missing file."""
    found: dict[tuple[int, int], str] = {}
    for entry in os.listdir(src_dir):
        m = SHARD_RE.match(entry)
        if m:
            found[(int(m[1]), int(m[2]))] = os.path.join(src_dir, entry)
    if not found:
        raise WeightsError(f"{src_dir} holds no checkpoint_last-model_part-<K>-shard<N>.pt files")
    parts = parts or 1 + max(k for k, _ in found)
    shards = shards or 1 + max(n for _, n in found)
    missing = [f"checkpoint_last-model_part-{k}-shard{n}.pt"
               for k in range(parts) for n in range(shards) if (k, n) not in found]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise WeightsError(f"{src_dir} lacks {len(missing)} of the {parts * shards} shard files: {shown}. "
                           "Download them again (README: OPT-175B weights)")
    return [[found[(k, n)] for n in range(shards)] for k in range(parts)]


def _load(path: str, problems: list[str]) -> dict | None:
    try:
        ckpt = torchzip.load(path)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            pickle.UnpicklingError) as e:
        problems.append(f"{os.path.basename(path)}: unreadable ({type(e).__name__}: {e})")
        return None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        problems.append(f"{os.path.basename(path)}: no 'model' dictionary (not a metaseq checkpoint)")
        return None
    return ckpt


def _clean(name: str) -> str:
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def _fsdp_part(ckpts: list[dict], paths: list[str], problems: list[str]) -> dict[str, Param]:
    """Un-flatten one model part: named parameters located in its ranks' flat parameters."""
    params: dict[str, Param] = {}
    for m, module in enumerate(ckpts[0]["shard_metadata"]["param_metadata"]):
        path = module["fsdp_path"]
        for flat_name, info in module["params"].items():
            key = f"{path}.{flat_name}" if path else flat_name
            runs = []  # (tensor, unpadded length) per rank
            for ckpt, file in zip(ckpts, paths):
                ref = ckpt["model"].get(key)
                if not isinstance(ref, TensorRef):
                    problems.append(f"{os.path.basename(file)}: flat parameter {key} is missing")
                    return {}
                pad = ckpt["shard_metadata"]["param_metadata"][m]["params"][flat_name]["padding"]
                runs.append((ref, ref.numel - int(pad)))
                if module.get("no_broadcast_optim_state"):
                    break
            if sum(n for _, n in runs) != sum(info["numels"]):
                problems.append(f"part of {os.path.basename(paths[0])}: {key} holds {sum(n for _, n in runs)} "
                                f"elements, its metadata says {sum(info['numels'])}")
                continue
            _split_runs(params, path, info, runs)
        for src, dst in module.get("shared_param_info", []):
            if _clean(src) in params:
                params[_clean(dst)] = params[_clean(src)]
    return params


def _split_runs(params: dict[str, Param], path: str, info: dict, runs: list[tuple[TensorRef, int]]) -> None:
    """Cut the concatenated unpadded runs into the named parameters, by `numels`."""
    r, used = 0, 0
    for name, shape, numel in zip(info["names"], info["shapes"], info["numels"]):
        full = _clean(f"{path}.{name}" if path else name)
        param, need = Param(full, tuple(int(s) for s in shape)), int(numel)
        while need:
            ref, length = runs[r]
            take = min(need, length - used)
            if take:
                param.pieces.append((ref, used, used + take))
            need, used = need - take, used + take
            if used == length:
                r, used = r + 1, 0
        params[full] = param


def _plain_part(ckpt: dict) -> dict[str, Param]:
    """A part whose `model` holds whole tensors (reshard or consolidated files)."""
    out = {}
    for name, ref in ckpt["model"].items():
        if isinstance(ref, TensorRef):
            out[_clean(name)] = Param(_clean(name), ref.shape, [(ref, 0, ref.numel)])
    return out


def index_source(src: str, parts: int | None = None, shards: int | None = None) -> list[dict[str, Param]]:
    """Every model part's named parameters, from a shard folder, a reshard folder or one .pt file."""
    problems: list[str] = []
    if os.path.isfile(src):
        groups = [[src]]
    elif any(SHARD_RE.match(e) for e in os.listdir(src)):
        groups = find_shards(src, parts, shards)
    else:
        found = {int(m[1]): os.path.join(src, e) for e in os.listdir(src) if (m := RESHARD_RE.match(e))}
        if not found:
            raise WeightsError(f"{src} holds no metaseq checkpoint files")
        groups = [[found[k]] for k in range(1 + max(found)) if k in found]
    files = sum(len(g) for g in groups)
    result = []
    with progress(files, "reading shard metadata", unit="file") as bar:
        for group in groups:
            ckpts = []
            for path in group:
                ckpts.append(_load(path, problems))
                bar.update(1)
            if any(c is None for c in ckpts):
                continue
            if "shard_metadata" not in ckpts[0]:
                result.append(_plain_part(ckpts[0]))
                continue
            try:
                result.append(_fsdp_part(ckpts, group, problems))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                problems.append(f"{os.path.basename(group[0])} and its ranks: shard_metadata does not "
                                f"match the model dictionaries ({type(e).__name__}: {e})")
    if problems:
        shown = "\n  ".join(problems[:30]) + (f"\n  and {len(problems) - 30} more" if len(problems) > 30 else "")
        raise WeightsError(f"{len(problems)} problems in {src}:\n  {shown}\nDownload those files again")
    return result


def _rule(name: str) -> str:
    """How Megatron split a (non-qkv) parameter across parts: rows (dim 0), cols (dim 1) or same."""
    if "layer_norm" in name:
        return "same"
    if name.endswith(("fc2.weight", "out_proj.weight")):
        return "cols"
    if name.endswith(("fc1.weight", "fc1.bias", "embed_tokens.weight")) or \
            re.search(r"\.(q|k|v)_proj\.(weight|bias)$", name):
        return "rows"
    return "same"


def output_plan(parts: list[dict[str, Param]]) -> dict[str, tuple[str, str, int, tuple[int, ...]]]:
    """Weight-folder name -> (rule, source parameter, qkv third, glued shape)."""
    plan = {}
    for src in parts[0]:
        shapes = [p[src].shape if src in p else None for p in parts]
        if None in shapes:
            raise WeightsError(f"{src} is in model part 0 but not in every part")
        if ".qkv_proj." in src:
            if any(s[0] % 3 for s in shapes):
                raise WeightsError(f"{src}: fused rows {[s[0] for s in shapes]} are not multiples of 3")
            for third, x in enumerate("kvq"):
                rows = sum(s[0] // 3 for s in shapes)
                plan[hf_key_to_file_name(src.replace("qkv_proj", f"{x}_proj"))] = (
                    "qkv", src, third, (rows,) + shapes[0][1:])
            continue
        rule = _rule(src)
        shape = shapes[0]
        if rule == "rows":
            shape = (sum(s[0] for s in shapes),) + shape[1:]
        elif rule == "cols":
            shape = (shape[0], sum(s[1] for s in shapes)) + shape[2:]
        plan[hf_key_to_file_name(src)] = (rule, src, 0, shape)
    return plan


def glue(spec: tuple[str, str, int, tuple[int, ...]], parts: list[dict[str, Param]],
         warnings: list[str]) -> np.ndarray:
    """One glued fp16 tensor, read part by part straight into its place."""
    rule, src, third, shape = spec
    out = np.empty(shape, np.float16)
    flat = out.reshape(-1)
    if rule in ("rows", "qkv"):
        pos = 0
        for part in parts:
            p = part[src]
            n = p.numel // 3 if rule == "qkv" else p.numel
            p.read(flat[pos:pos + n], start=third * n)
            pos += n
    elif rule == "cols":
        col = 0
        for part in parts:
            p = part[src]
            block = np.empty(p.shape, np.float16)
            p.read(block.reshape(-1))
            out[:, col:col + p.shape[1]] = block
            col += p.shape[1]
    else:
        parts[0][src].read(flat)
        other = np.empty_like(flat)
        for k, part in enumerate(parts[1:], 1):
            part[src].read(other)
            if not np.array_equal(other, flat, equal_nan=True):
                diff = np.abs(other.astype(np.float32) - flat.astype(np.float32)).max()
                warnings.append(f"{src}: replicated, but part {k} differs from part 0 by up to {diff:.3g}; "
                                "part 0 kept")
    return out


def infer_config(plan: dict, name: str) -> OptConfig:
    """An OptConfig with the sizes the glued shapes show (heads are not visible in shapes: 1 is used)."""
    shape = {n: spec[3] for n, spec in plan.items()}
    try:
        vocab, hidden = shape["decoder.embed_tokens.weight"]
        layers = 1 + max(int(m[1]) for n in shape if (m := re.match(r"decoder\.layers\.(\d+)\.", n)))
        return OptConfig(name=name, num_hidden_layers=layers, n_head=1, hidden_size=hidden, input_dim=hidden,
                         ffn_embed_dim=shape["decoder.layers.0.fc1.weight"][0], vocab_size=vocab,
                         max_seq_len=shape["decoder.embed_positions.weight"][0] - 2)
    except (KeyError, ValueError) as e:
        raise WeightsError("the checkpoint does not look like an OPT decoder (it lacks decoder.embed_tokens, "
                           f"decoder.embed_positions or decoder.layers.0.fc1: {e})") from None


def _shape_problems(plan: dict, expected: dict[str, tuple[int, ...]], model: str) -> None:
    bad = [f"{n}: checkpoint {plan[n][3]}, {model} {s}" for n, s in expected.items()
           if n in plan and tuple(plan[n][3]) != tuple(s)]
    missing = [n for n in expected if n not in plan]
    if bad or missing:
        lines = bad[:20] + [f"{n}: missing" for n in missing[:20]]
        raise WeightsError(f"this checkpoint is not {model}:\n  " + "\n  ".join(lines))


def convert_metaseq_shards(src_dir: str, out_dir: str, *, config: OptConfig | None = None,
                           parts: int | None = None, shards: int | None = None) -> str:
    """Convert a metaseq checkpoint (992-file layout, reshard parts or one .pt) into `out_dir`, one
    np.save file per tensor. Sizes come from the files; `config`, when given, must match them. Resumable:
    a rerun skips finished tensors. Returns out_dir."""
    src_dir, out_dir = os.path.expanduser(src_dir), os.path.expanduser(out_dir)
    if not os.path.exists(src_dir):
        raise WeightsError(f"source {src_dir} does not exist")
    part_params = index_source(src_dir, parts, shards)
    plan = output_plan(part_params)
    name = os.path.basename(os.path.normpath(out_dir)).removesuffix("-np")
    config = config or infer_config(plan, name)
    expected = expected_tensors(config)
    _shape_problems(plan, expected, config.name)
    folder = WeightFolder(out_dir, expected, model=config.name, source=os.path.abspath(src_dir))
    folder.check_disk()
    todo = folder.pending()
    print(f"{config.name}: {len(part_params)} model parts -> {folder.folder}: {len(todo)} of {len(expected)} "
          f"tensors to write ({gib(folder.pending_bytes())}); no temporary files beyond one tensor; "
          f"peak memory about {gib(2 * folder.largest_bytes())} (twice the largest tensor)")
    ignored = sorted(set(plan) - set(expected))
    if ignored:
        print(f"not part of the weight folder (skipped): {', '.join(ignored)}")
    warnings: list[str] = []
    with progress(folder.pending_bytes(), "gluing tensors") as bar:
        for out_name in todo:
            arr = glue(plan[out_name], part_params, warnings)
            folder.write(out_name, arr)
            bar.update(arr.nbytes)
            del arr
    for w in warnings:
        print(f"warning: {w}")
    return folder.finish()
