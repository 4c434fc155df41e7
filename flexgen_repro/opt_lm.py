"""OptLM: an OPT model whose weights, KV cache and activations live where a Policy says, and
`generate` over any number of prompts, block by block (gpu_batch_size x num_gpu_batches prompts).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from flexgen_repro.config import OptConfig
from flexgen_repro.model.layers import build_layers
from flexgen_repro.model.weight_home import DUMMY, WeightLoader
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.policy import Policy, prefetch_layers
from flexgen_repro.schedule import BlockRun
from flexgen_repro.trace import Tracer, activate
from flexgen_repro.weights.layout import weight_dir


@dataclass
class RunTimes:
    """Wall time of each generation step, summed over blocks: prefill is step 0."""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    blocks: int = 0
    decode_steps: list[float] = field(default_factory=list)


def _as_prompts(inputs, pad: int) -> np.ndarray:
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.cpu().numpy()
    if isinstance(inputs, np.ndarray):
        arr = inputs
    else:
        rows = [list(r) for r in inputs]
        if not rows:
            raise ValueError("generate() needs at least one prompt")
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"prompts must have equal length (left-pad them with pad id {pad}); "
                             f"got lengths {sorted(lengths)}")
        arr = np.array(rows)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"inputs must be a 2-D (prompts, prompt_len) array of token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"inputs must be integer token ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


class OptLM:
    """`path` holds `<config.name>-np/`, or is "_DUMMY_" for dummy weights. `options`: how it
    runs (None: the env's options, else RuntimeOptions())."""

    def __init__(self, config: OptConfig, env, path: str, policy: Policy,
                 options: RuntimeOptions | None = None):
        self.config, self.env, self.policy = config, env, policy
        self.options = options or getattr(env, "options", None) or RuntimeOptions()
        # the run's timeline (RuntimeOptions.trace_path), recorded while generate runs
        self.tracer = Tracer(self.options.trace_path) if self.options.trace_path else None
        self.dtype = config.torch_dtype
        self.layers = self.build_layers()
        folder = None
        if path != DUMMY:
            folder = weight_dir(path, config.name)
            _check_folder(config, folder)
        loader = WeightLoader(env, path, folder, policy, self.dtype, config.dtype_bytes)
        self.weight_home, self.weight_placement = loader.place(self.layers)
        largest = max((sum(s.nbytes for s in home.values()) for home in self.weight_home), default=0)
        self.prefetch_layers = prefetch_layers(policy, largest)  # weights loaded ahead (overlap)
        self.times = RunTimes()
        self.block_state: dict = {}  # cache homes kept between blocks, and graphs captured on them

    def build_layers(self) -> list:
        """The layers this model runs, in execution order (a pipeline stage holds a range)."""
        return build_layers(self.config, self.policy.sep_layer)

    def release_cache(self) -> None:
        """Free the KV cache kept between calls (schedule/driver.py says when it is reused) and
        the graphs captured on it."""
        for home in self.block_state.get("homes", {}).values():
            for t in home:
                self.env.mixed.free(t)
        self.block_state.clear()

    def _check_vocab(self, arr: np.ndarray) -> None:
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{arr.min()}, {arr.max()}]")

    def _check_lengths(self, prompts: np.ndarray, max_new_tokens: int, do_sample: bool,
                       temperature: float) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompts.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt_len + max_new_tokens = {prompts.shape[1] + max_new_tokens} "
                             f"exceeds the model's {self.config.max_seq_len} positions")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")

    def generate(self, inputs, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, stop: int | None = None, seed: int | None = None,
                 max_steps: int | None = None, attention_mask=None,
                 eos_token_ids: Iterable[int] | None = None, top_p: float = 1.0,
                 stop_check: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 cache_len: int | None = None) -> np.ndarray:
        """Token ids (prompts, prompt_len + max_new_tokens); after `stop` a row holds pad ids.

        `attention_mask` (prompts, prompt_len), optional: 1 for real tokens, 0 for (left) padding;
        by default every position holding the pad id is padding. A row ends after any of
        `eos_token_ids` (or `stop`), or when `stop_check(rows, generated)` says so for it (rows:
        indices into `inputs`; generated: their ids so far, (len(rows), tokens)); the rest of an
        ended row is pad ids, and a GPU batch whose rows all ended decodes no further.
        `max_steps` (benchmark warm-up): generate only that many tokens, with the cache sized and
        kept for `max_new_tokens`, so a following full call reuses it; the rest stays pad.
        `cache_len`: positions of the cache kept between calls (default: prompt_len +
        max_new_tokens); calls of other lengths that fit it reuse it, and the CUDA graphs
        captured on it, instead of allocating and capturing anew.
        """
        prompts = _as_prompts(inputs, self.config.pad_token_id)
        self._check_vocab(prompts)
        mask = _as_mask(attention_mask, prompts, self.config.pad_token_id)
        self._check_lengths(prompts, max_new_tokens, do_sample, temperature)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        pick = self._picker(do_sample, temperature, seed, top_p)
        ends = set(eos_token_ids or ()) | ({int(stop)} if stop is not None else set())
        self.times = RunTimes()
        outs = []
        with activate(self.tracer):
            for start, block, n in self._blocks(prompts):
                check = None if stop_check is None else \
                    (lambda rows, ids, s=start: stop_check(rows + s, ids))
                live = np.arange(block.shape[0]) < n
                out = self._run_block(block, max_new_tokens, pick, frozenset(ends) or None,
                                      max_steps, live=live, stop_check=check, cache_len=cache_len,
                                      prompt_mask=_fill_rows(mask[start:start + n], block.shape[0]))
                outs.append(out[:n])
        return np.concatenate(outs, axis=0)

    def logits(self, inputs) -> np.ndarray:
        """Float32 logits (prompts, prompt_len, vocab) of every position, through the runtime."""
        prompts = _as_prompts(inputs, self.config.pad_token_id)
        self._check_vocab(prompts)
        outs = []
        with activate(self.tracer):
            for _, block, n in self._blocks(prompts):
                run = BlockRun(self, block, 1, None, None, want_logits=True)
                try:
                    run.run()
                finally:
                    run.close()
                outs.append(run.logits[:n])
        return np.concatenate(outs, axis=0)

    def _blocks(self, prompts: np.ndarray):
        """(start, block, real rows): blocks of exactly block_size prompts; the last is filled
        with copies of its last prompt."""
        size = self.policy.block_size
        for start in range(0, prompts.shape[0], size):
            block = prompts[start:start + size]
            yield start, _fill_rows(block, size), block.shape[0]

    def _run_block(self, block, gen_len, pick, stop, max_steps=None, **rows) -> np.ndarray:
        run = BlockRun(self, block, gen_len, pick, stop, max_steps=max_steps, **rows)
        try:
            out = run.run()
        finally:
            run.close()
        self.times.blocks += 1
        self.times.prefill_s += run.step_times[0]
        self.times.decode_s += sum(run.step_times[1:])
        self.times.decode_steps.extend(run.step_times[1:])
        return out

    def _picker(self, do_sample: bool, temperature: float, seed: int | None, top_p: float = 1.0):
        if not do_sample:
            return lambda logits: logits.argmax(dim=-1)
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

        def sample(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
            if top_p < 1:
                probs = _nucleus(probs, top_p)
            return torch.multinomial(probs, 1, generator=gen)[:, 0].to(logits.device)
        return sample


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (rows, vocab) kept on the smallest set of most likely ids whose mass reaches top_p."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the ids ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def _fill_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` followed by copies of its last row, `size` rows in all."""
    if rows.shape[0] >= size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - rows.shape[0], axis=0)])


def _as_mask(mask, prompts: np.ndarray, pad: int) -> np.ndarray:
    """The prompts' attention mask as bool (prompts, prompt_len); by default `prompts != pad`."""
    if mask is None:
        return prompts != pad
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    mask = np.asarray(mask)
    if mask.shape != prompts.shape:
        raise ValueError(f"attention_mask must have the inputs' shape {prompts.shape}, got {mask.shape}")
    mask = mask.astype(bool)
    if not mask.any(axis=1).all():
        raise ValueError("every prompt needs at least one real token (attention_mask row of zeros)")
    return mask


def _check_folder(config: OptConfig, folder: str) -> None:
    """Refuse a weight folder with missing or misshapen tensors, naming them and the fix."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"no weight folder {folder}; run `invoke prepare-weights --model {config.name}` "
            "(or pass --path _DUMMY_ for dummy weights)")
    try:
        from flexgen_repro.weights.verify import check_folder
    except ImportError:
        check_folder = None
    if check_folder is not None:
        check_folder(config, folder)
