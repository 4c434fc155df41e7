"""Prompts of any lengths as blocks the runtime can run, and generated ids back as completions.

Prompts are sorted by length and cut into blocks of `block_size`; each block is left-padded to its
longest prompt (rounded up to a multiple of 8) with an explicit attention mask: padding is never
inferred from the pad id, which a real token may equal. Each block's KV cache gets one of a few
lengths (`cache_capacity`), so consecutive blocks of different prompt lengths share the cache and
the CUDA graphs captured on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPT_ALIGN = 8        # block widths are multiples of this (tensor-core friendly GEMM shapes)


def bucket(length: int, limit: int) -> int:
    """`length` rounded up to a multiple of PROMPT_ALIGN, at most `limit` (never below `length`)."""
    return max(length, min(-(-length // PROMPT_ALIGN) * PROMPT_ALIGN, limit))


def cache_capacity(need: int, top: int, steps_per_octave: int) -> int:
    """The cache length of a block needing `need` positions: `need` rounded up to one of
    `steps_per_octave` evenly spaced lengths per doubling (2: 64, 96, 128, 192, 256, ...; 8: at
    most 1/8 over), and never above `top` (the longest the run was planned for) unless `need` is.

    Few lengths mean few cache re-allocations and graph captures; a longer cache than needed costs
    memory (bounded by `top`) and, where the whole cache is read each step (host or disk tier),
    bandwidth: callers pass 2 steps for a GPU-resident cache and 8 otherwise."""
    octave = 1 << max(need - 1, 1).bit_length() - 1      # the power of two below need
    step = max(octave // steps_per_octave, PROMPT_ALIGN)
    return max(need, min(-(-need // step) * step, top))


@dataclass(frozen=True)
class Block:
    """Rows of one block: `index` into the caller's prompts, ids left-padded to one length, mask."""
    index: np.ndarray   # (rows,) int
    ids: np.ndarray     # (rows, prompt_len) int64
    mask: np.ndarray    # (rows, prompt_len) bool: real tokens

    @property
    def prompt_len(self) -> int:
        return self.ids.shape[1]


def longest_first(token_ids: list[list[int]]) -> np.ndarray:
    """Indices of `token_ids` by length, longest first, ties in input order (the blocks' order)."""
    return np.argsort(-np.array([len(t) for t in token_ids]), kind="stable")


def make_blocks(token_ids: list[list[int]], block_size: int, pad_id: int, limit: int) -> list[Block]:
    """Blocks of at most `block_size` prompts of similar length (longest first), each padded to
    bucket(its longest prompt, limit)."""
    lengths = np.array([len(t) for t in token_ids])
    order = longest_first(token_ids)
    blocks = []
    for start in range(0, len(order), block_size):
        index = order[start:start + block_size]
        width = bucket(int(lengths[index].max()), limit)
        ids = np.full((len(index), width), pad_id, np.int64)
        mask = np.zeros((len(index), width), bool)
        for row, i in enumerate(index):
            n = len(token_ids[i])
            ids[row, width - n:] = token_ids[i]
            mask[row, width - n:] = True
        blocks.append(Block(index, ids, mask))
    return blocks


@dataclass(frozen=True)
class Completion:
    """One prompt's result: the completion's text (not the prompt's), its ids, the prompt's token
    count, and why it ended: "length" (max_new_tokens), "eos" or "stop" (a stop string)."""
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str


class Finisher:
    """Ends generated ids at the first end-of-sequence id or stop string, as a Completion."""

    def __init__(self, tokenizer, eos_ids: frozenset[int], stop: tuple[str, ...]):
        self.tokenizer, self.eos_ids, self.stop = tokenizer, eos_ids, stop

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stopped(self, ids) -> bool:
        """Whether the text of `ids` holds a stop string (checked while generating)."""
        return bool(self.stop) and any(s in self.decode(ids) for s in self.stop)

    def finish(self, generated: np.ndarray, prompt_tokens: int) -> Completion:
        ids = [int(t) for t in generated]
        reason = "length"
        for n, t in enumerate(ids):
            if t in self.eos_ids:
                ids, reason = ids[:n + 1], "eos"
                break
        text = self.decode(ids[:-1] if reason == "eos" else ids)
        cut = self._first_stop(text)
        if cut is not None:
            ids = self._shortest_prefix(ids, text[:cut])
            return Completion(text[:cut], ids, prompt_tokens, "stop")
        return Completion(text, ids, prompt_tokens, reason)

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _shortest_prefix(self, ids: list[int], kept: str) -> list[int]:
        """The fewest leading ids whose text goes past `kept` (the token that completed the stop
        string is the last one kept, as a streaming run would have seen it)."""
        for n in range(1, len(ids) + 1):
            text = self.decode(ids[:n])
            if len(text) > len(kept) and self._first_stop(text) is not None:
                return ids[:n]
        return ids
