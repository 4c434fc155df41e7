"""`LLM`: text prompts in, completions out, through the offloading runtime.

    with LLM("smollm2-135m-instruct", policy="auto") as llm:
        for c in llm.generate(["The capital of France is"], max_new_tokens=8):
            print(c.text, c.finish_reason)

Prompts of any lengths are grouped by length into blocks (text/batching.py), left-padded with an
explicit attention mask, so each greedy completion equals the model's greedy generation on that
prompt alone. The weights load on the first `generate`, once the prompt lengths are known (the cost
model's policy depends on them).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flexgen_repro.policy import Policy
from flexgen_repro.text import model as text_model
from flexgen_repro.text.batching import Completion, Finisher, cache_capacity, make_blocks
from flexgen_repro.text.model import DUMMY, TextJobError

__all__ = ["LLM", "Completion", "TextJobError"]
_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class GenerateStats:
    """What the last `generate` did: prompts, tokens (useful and padded) and wall time."""
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    padded_positions: int = 0     # prompt positions of every block row, padding and filler included
    blocks: int = 0
    wall_s: float = 0.0

    def plus(self, other: "GenerateStats") -> "GenerateStats":
        """Both runs' counts and wall times summed."""
        return GenerateStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


class LLM:
    """A model ready for text generation. `model`: a known name or a local checkpoint folder;
    `path`: the folder holding `<name>-np/` (prepared from the checkpoint when missing), or
    "_DUMMY_" for dummy weights (then `tokenizer` is required); `policy`: a Policy, or None /
    "auto" for the cost model's choice (`hardware`: its profile; default: the measured `local`
    profile or the shipped one nearest this machine); `dtype`: "float16", "bfloat16" or
    "float32" (default: float16 on a GPU, float32 without one; text_model.default_dtype)."""

    def __init__(self, model: str, path: str = "~/opt_weights", policy: Policy | str | None = None,
                 offload_dir: str | None = None, dtype: str | None = None,
                 tokenizer: str | None = None, hardware: str | None = None):
        if dtype is not None and dtype not in _DTYPES:
            raise TextJobError(f"dtype {dtype!r} is not supported: choose one of {list(_DTYPES)}")
        if not (policy is None or policy == "auto" or isinstance(policy, Policy)):
            raise TextJobError(f"policy must be a Policy, None or 'auto', got {policy!r}")
        self.model, self.path, self.offload_dir, self.hardware = model, path, offload_dir, hardware
        self.config = text_model.model_config(model, dtype=dtype or text_model.default_dtype())
        self.dummy = path == DUMMY
        self.tokenizer = text_model.load_tokenizer(model, self.config, tokenizer, self.dummy)
        self.policy = policy if isinstance(policy, Policy) else None
        self.stats = GenerateStats()
        # the longest prompt + generation this model is planned for (the cost model's policy, and
        # the most cache positions a block gets); `generate` raises it for longer inputs, and
        # the command sets it from the whole input before the first window
        self.plan_len = 0
        self._env = self._lm = None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end a completion (the model config's end-of-sequence ids)."""
        ids = getattr(self.config, "eos_token_ids", None)
        if ids is None:
            eos = self.config.eos_token_id
            ids = () if eos is None else (eos,)
        return frozenset(int(i) for i in ids)

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, as the checkpoint's tokenizer makes them (special tokens too)."""
        return [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def check_lengths(self, token_ids: list[list[int]], max_new_tokens: int, names=None,
                      truncate: str | None = None) -> list[list[int]]:
        """Prompts that fit the model's positions with `max_new_tokens`; `truncate="left"` keeps
        the tail of longer ones, otherwise they are an error naming the prompt (`names[i]`)."""
        room = self.config.max_seq_len - max_new_tokens
        if room < 1:
            raise TextJobError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in "
                               f"{self.config.name}'s {self.config.max_seq_len} positions")
        out = []
        for i, ids in enumerate(token_ids):
            name = names[i] if names is not None else i
            if not ids:
                raise TextJobError(f"prompt {name} has no tokens: give it some text")
            if len(ids) > room:
                if truncate != "left":
                    raise TextJobError(
                        f"prompt {name} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} "
                        f"at most {room} fit {self.config.name}'s {self.config.max_seq_len} positions "
                        "(shorten it, lower max_new_tokens, or truncate left: --truncate left)")
                ids = ids[-room:]
            out.append(ids)
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None
                 ) -> list[Completion]:
        """One Completion per prompt, in input order; greedy where temperature is 0."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TextJobError("prompts must be a list of strings")
        if not prompts:
            return []
        ids = self.check_lengths(self.tokenize(prompts), max_new_tokens)
        return self.generate_ids(ids, max_new_tokens, temperature, top_p, seed, stop)

    def generate_ids(self, token_ids: list[list[int]], max_new_tokens: int = 32,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     stop: Sequence[str] | None = None,
                     on_block: Callable[[np.ndarray, list[Completion]], None] | None = None
                     ) -> list[Completion]:
        """`generate` from token ids (checked by `check_lengths`); `on_block(index, completions)`
        is called as each block finishes (index: positions in `token_ids`)."""
        if max_new_tokens < 1:
            raise TextJobError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise TextJobError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        start = time.perf_counter()
        longest = max(len(t) for t in token_ids)
        self.plan_len = max(self.plan_len, longest + max_new_tokens)
        lm = self._load(self.plan_len - max_new_tokens, max_new_tokens, len(token_ids))
        per_octave = 2 if lm.policy.cache_gpu_percent == 100 else 8
        limit = self.config.max_seq_len - max_new_tokens
        finisher = Finisher(self.tokenizer, self.eos_token_ids, tuple(stop or ()))
        blocks = make_blocks(token_ids, lm.policy.block_size, self.config.pad_token_id, limit)
        results: list[Completion | None] = [None] * len(token_ids)
        self.stats = GenerateStats(prompts=len(token_ids), prompt_tokens=sum(map(len, token_ids)))
        for b, block in enumerate(blocks):
            check = None
            if stop:
                check = lambda rows, gen: [finisher.stopped(g) for g in gen]  # noqa: E731
            out = lm.generate(block.ids, max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature or 1.0, top_p=top_p,
                              seed=None if seed is None else seed + b, attention_mask=block.mask,
                              eos_token_ids=self.eos_token_ids, stop_check=check,
                              cache_len=cache_capacity(block.prompt_len + max_new_tokens,
                                                       self.plan_len, per_octave))
            done = [finisher.finish(row[block.prompt_len:], len(token_ids[i]))
                    for row, i in zip(out, block.index)]
            for i, c in zip(block.index, done):
                results[i] = c
            self.stats.generated_tokens += sum(len(c.token_ids) for c in done)
            self.stats.padded_positions += block.ids.size
            self.stats.blocks += 1
            if on_block is not None:
                on_block(block.index, done)
        self.stats.wall_s = time.perf_counter() - start
        return results

    def _load(self, prompt_len: int, gen_len: int, prompts: int):
        """The runtime model, made on first use (the policy chosen for these lengths if none was
        given)."""
        if self._lm is not None:
            return self._lm
        from flexgen_repro.devices.env import ExecutionEnv
        from flexgen_repro.opt_lm import OptLM
        if self.policy is None:
            self.policy = text_model.auto_policy(self.config, prompt_len, gen_len, prompts, self.hardware)
        folder_root = DUMMY if self.dummy else self.path
        if not self.dummy:
            text_model.weight_folder(self.model, self.config, self.path)
        self._env = ExecutionEnv.create(self.offload_dir)
        try:
            self._lm = OptLM(self.config, self._env, folder_root, self.policy)
        except BaseException:
            self.close()
            raise
        return self._lm

    def close(self) -> None:
        """Free the cache and join the copy threads (the weights go with this object)."""
        if self._lm is not None:
            self._lm.release_cache()
        if self._env is not None:
            self._env.close()
        self._env = self._lm = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
