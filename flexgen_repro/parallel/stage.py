"""One pipeline stage: the contiguous range of an OPT model's layers that one rank holds (the
embedding on the first stage, the output head on the last), placed by that rank's own Policy.

`StageLM` is an OptLM built over its range only; `StageRun` is the block driver's state for one
micro-batch (gpu_batch_size x num_gpu_batches prompts) whose first layer reads the hidden states
the previous stage sent and whose last layer leaves its output for the next stage.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np
import torch

from flexgen_repro.config import OptConfig
from flexgen_repro.model.base import Layer
from flexgen_repro.model.layers import build_layers
from flexgen_repro.opt_lm import OptLM, RunTimes, _as_prompts
from flexgen_repro.schedule import BlockRun


@dataclass(frozen=True)
class Stage:
    """Stage `rank` of `size`: decoder layers [first_layer, stop_layer)."""
    rank: int
    size: int
    first_layer: int
    stop_layer: int

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def layer_slice(self, per_layer: int) -> slice:
        """This stage's part of build_layers' list ([embed] + per_layer per decoder layer + [head])."""
        start = 0 if self.first else 1 + self.first_layer * per_layer
        stop = 1 + self.stop_layer * per_layer + (1 if self.last else 0)
        return slice(start, stop)


def split_stages(num_layers: int, stages: int) -> list[Stage]:
    """Decoder layers split as evenly as possible, the earlier stages taking one more where the
    split is uneven (the original dist_flex_opt's rule)."""
    if stages < 1 or num_layers < stages:
        raise ValueError(f"{stages} pipeline stages need at least {stages} decoder layers; the model "
                         f"has {num_layers}: use fewer processes (--nproc-per-node)")
    sizes = [num_layers // stages + int(r < num_layers % stages) for r in range(stages)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [Stage(r, stages, starts[r], starts[r + 1]) for r in range(stages)]


class StageLM(OptLM):
    """The layers of `stage` only, at home where `policy` says. `micro_batches` blocks of
    policy.block_size prompts are in flight through the pipeline at once."""

    def __init__(self, config: OptConfig, env, path: str, policy, stage: Stage,
                 micro_batches: int = 1, options=None):
        if micro_batches < 1:
            raise ValueError(f"--num-inner-iterations must be >= 1, got {micro_batches}")
        self.stage, self.micro_batches = stage, micro_batches
        super().__init__(config, env, path, policy, options)

    def build_layers(self) -> list[Layer]:
        per_layer = 2 if self.policy.sep_layer else 1
        return build_layers(self.config, self.policy.sep_layer)[self.stage.layer_slice(per_layer)]

    @property
    def pipeline_block(self) -> int:
        """Prompts in flight at once: micro_batches x gpu_batch_size x num_gpu_batches."""
        return self.micro_batches * self.policy.block_size

    def cache_homes(self, micro: int, prompt_len: int, gen_len: int) -> MutableMapping:
        """Micro-batch `micro`'s cache homes, kept (like OptLM's) while the lengths stay the same."""
        key = (prompt_len, gen_len)
        if self.block_state.get("key") != key:
            self.release_cache()
            self.block_state.update(key=key, homes={})
        return _MicroHomes(self.block_state["homes"], micro)

    def start(self, inputs, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
              seed: int | None = None) -> tuple[np.ndarray, object]:
        """The checked prompts and the picker of a pipelined generate (the same checks as OptLM)."""
        prompts = _as_prompts(inputs, self.config.pad_token_id)
        self._check_vocab(prompts)
        self._check_lengths(prompts, max_new_tokens, do_sample, temperature)
        self.times = RunTimes()
        return prompts, self._picker(do_sample, temperature, seed)


class _MicroHomes(MutableMapping):
    """The (layer, GPU batch) -> cache home map of one micro-batch, inside the model's shared map
    (so OptLM.release_cache frees every micro-batch's homes)."""

    def __init__(self, homes: dict, micro: int):
        self.homes, self.micro = homes, micro

    def __getitem__(self, key):
        return self.homes[(self.micro, *key)]

    def __setitem__(self, key, value):
        self.homes[(self.micro, *key)] = value

    def __delitem__(self, key):
        del self.homes[(self.micro, *key)]

    def __iter__(self):
        return ((j, k) for (m, j, k) in self.homes if m == self.micro)

    def __len__(self):
        return sum(1 for _ in self)


class StageRun(BlockRun):
    """One micro-batch on one stage: the first layer's input comes from `inbox` (hidden states
    the previous stage sent) and the last layer's output goes to `outbox`, except at the ends of
    the pipeline, where the ids and the picked tokens are."""

    def __init__(self, lm: StageLM, input_ids: np.ndarray, gen_len: int, pick, micro: int,
                 max_steps: int | None = None):
        super().__init__(lm, input_ids, gen_len, pick, None, max_steps=max_steps)
        self.stage = lm.stage
        self.cache_home = lm.cache_homes(micro, self.prompt_len, gen_len)
        self.inbox: dict[int, torch.Tensor] = {}
        self.outbox: dict[int, torch.Tensor] = {}

    def hidden_shape(self, i: int) -> tuple[int, int, int]:
        """(b, s, h) of the hidden states crossing between stages at token i."""
        return self.B, self.prompt_len if i == 0 else 1, self.config.hidden_size

    def load_hidden(self, i: int, j: int, k: int):
        if j == 0 and not self.stage.first:
            return self.inbox.pop(k)
        return super().load_hidden(i, j, k)

    def store_hidden(self, i: int, j: int, k: int, out) -> None:
        if j == len(self.layers) - 1 and not self.stage.last:
            self.outbox[k] = out
            return
        super().store_hidden(i, j, k, out)

    def ids(self, i: int, k: int) -> torch.Tensor:
        """The ids GPU batch k picked at token i, (b,) int64."""
        return torch.from_numpy(self.output_ids[k * self.B:(k + 1) * self.B, self.prompt_len + i].copy())
