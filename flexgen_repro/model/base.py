"""The one interface every OPT layer implements, and what a step tells a layer.

A layer declares its weights (`specs`), and computes `forward` on the compute device given its
loaded weights; it never moves bytes itself. The driver (schedule/) loads weights and caches,
calls `forward`, and stores what comes back.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class WeightSpec:
    """One weight tensor of a layer: short key, weight-folder file name, shape, init kind."""
    key: str
    file: str
    shape: tuple[int, ...]
    kind: str  # "matrix", "bias", "ln_weight", "ln_bias", "embed"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class CachePart:
    """The previous keys and values of rows [start, stop), loaded where attention runs on them."""
    start: int
    stop: int
    device: torch.device
    k: object  # torch.Tensor (rows, heads, len, d) or CompressedTensor
    v: object
    resident: bool = False                   # k, v are the full home buffers (GPU, in place)
    write_index: torch.Tensor | None = None  # where the new token goes when resident
    valid: int | None = None                 # positions of k, v written so far (k may be longer)
    # k, v are plain buffers longer than `valid` that this step may write: the new token goes in
    # at `valid` (this step's own copy, or the home where its store writes the same bytes)
    in_place: bool = False


@dataclass
class StepInfo:
    """What one (token, GPU batch) step needs besides weights and cache."""
    i: int                                   # token index: 0 is prefill
    prompt_len: int
    mask: torch.Tensor                       # (b, cur_len) bool: real (not padding) positions
    positions: torch.Tensor                  # (b, s) position ids of this step's tokens
    attn_sparsity: float = 1.0
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None  # logits (b, vocab) -> ids (b,)
    want_logits: bool = False                # OutputEmbed returns logits of every position
    cpu_pool: object = None                  # an Executor: CPU attention runs there, deferred
    host_mask: torch.Tensor | None = None    # `mask` in host memory, for attention on the CPU
    host_stage: object = None                # a host_stage.HostStage: CPU attention's copies
    options: object = None                   # RuntimeOptions (CPU attention kernel); None: defaults
    write_index: torch.Tensor | None = None  # (1,) on the device: the new token's cache position
    _allowed: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def is_prefill(self) -> bool:
        return self.i == 0

    def prefill_allowed(self, window: int | None) -> torch.Tensor:
        """Prefill's (b, 1, s, s) attention mask (attention_math.prefill_allowed), made once per
        step and window and shared by its layers."""
        if window not in self._allowed:
            from flexgen_repro.model.attention_math import prefill_allowed
            self._allowed[window] = prefill_allowed(self.mask, window)
        return self._allowed[window]


class Deferred:
    """A layer's result still being computed (CPU attention on a worker): `result()` waits for
    it and finishes the layer (the GPU work after the attention). The driver calls it after
    starting the next GPU batch, so the CPU attends while the main thread prepares that batch."""

    def __init__(self, finish: Callable[[], object]):
        self._finish = finish

    def result(self):
        return self._finish()


class Layer(ABC):
    """InputEmbed, SelfAttention, MLP, TransformerLayer and OutputEmbed share this interface."""

    has_cache = False

    @abstractmethod
    def specs(self) -> list[WeightSpec]:
        """The weights this layer reads, in model order."""

    @abstractmethod
    def forward(self, x, w: dict, step: StepInfo, cache: list[CachePart] | None = None):
        """Compute on loaded weights `w`. Layers with a cache return (out, (k_new, v_new))."""
