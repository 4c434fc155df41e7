"""OptLM: an OPT model whose weights, KV cache and activations live where a Policy says, and
`generate` over any number of prompts, block by block (gpu_batch_size x num_gpu_batches prompts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from flexgen_repro.config import OptConfig
from flexgen_repro.model.layers import build_layers
from flexgen_repro.model.weight_home import DUMMY, WeightLoader
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.policy import Policy
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
        self.layers = build_layers(config, policy.sep_layer)
        folder = None
        if path != DUMMY:
            folder = weight_dir(path, config.name)
            _check_folder(config, folder)
        loader = WeightLoader(env, path, folder, policy, self.dtype, config.dtype_bytes)
        self.weight_home, self.weight_placement = loader.place(self.layers)
        self.times = RunTimes()
        self.block_state: dict = {}  # cache homes of the last shape, and graphs captured on them

    def release_cache(self) -> None:
        """Free the KV cache kept between calls (it is reused while prompt and generation
        lengths stay the same)."""
        for home in self.block_state.get("homes", {}).values():
            for t in home:
                self.env.mixed.free(t)
        self.block_state.clear()

    def _check_vocab(self, arr: np.ndarray) -> None:
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{arr.min()}, {arr.max()}]")

    def generate(self, inputs, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, stop: int | None = None, seed: int | None = None,
                 max_steps: int | None = None) -> np.ndarray:
        """Token ids (prompts, prompt_len + max_new_tokens); after `stop` a row holds pad ids.

        `max_steps` (benchmark warm-up): generate only that many tokens, with the cache sized and
        kept for `max_new_tokens`, so a following full call reuses it; the rest stays pad.
        """
        prompts = _as_prompts(inputs, self.config.pad_token_id)
        self._check_vocab(prompts)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompts.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt_len + max_new_tokens = {prompts.shape[1] + max_new_tokens} "
                             f"exceeds the model's {self.config.max_seq_len} positions")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        pick = self._picker(do_sample, temperature, seed)
        self.times = RunTimes()
        with activate(self.tracer):
            outs = [self._run_block(block, max_new_tokens, pick, stop, max_steps)[:n]
                    for block, n in self._blocks(prompts)]
        return np.concatenate(outs, axis=0)

    def logits(self, inputs) -> np.ndarray:
        """Float32 logits (prompts, prompt_len, vocab) of every position, through the runtime."""
        prompts = _as_prompts(inputs, self.config.pad_token_id)
        self._check_vocab(prompts)
        outs = []
        with activate(self.tracer):
            for block, n in self._blocks(prompts):
                run = BlockRun(self, block, 1, None, None, want_logits=True)
                try:
                    run.run()
                finally:
                    run.close()
                outs.append(run.logits[:n])
        return np.concatenate(outs, axis=0)

    def _blocks(self, prompts: np.ndarray):
        """Blocks of exactly block_size prompts; the last is filled with copies of its last prompt."""
        size = self.policy.block_size
        for start in range(0, prompts.shape[0], size):
            block = prompts[start:start + size]
            n = block.shape[0]
            if n < size:
                block = np.concatenate([block, np.repeat(block[-1:], size - n, axis=0)])
            yield block, n

    def _run_block(self, block, gen_len, pick, stop, max_steps=None) -> np.ndarray:
        run = BlockRun(self, block, gen_len, pick, stop, max_steps=max_steps)
        try:
            out = run.run()
        finally:
            run.close()
        self.times.blocks += 1
        self.times.prefill_s += run.step_times[0]
        self.times.decode_s += sum(run.step_times[1:])
        self.times.decode_steps.extend(run.step_times[1:])
        return out

    def _picker(self, do_sample: bool, temperature: float, seed: int | None):
        if not do_sample:
            return lambda logits: logits.argmax(dim=-1)
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

        def sample(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
            return torch.multinomial(probs, 1, generator=gen)[:, 0].to(logits.device)
        return sample


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
