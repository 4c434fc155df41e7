"""Lambada last-word accuracy: given a passage without its last word, does greedy decoding produce
exactly that word's tokens? An example counts as correct when, teacher-forced, the argmax at every
position of the target equals the target token (so a multi-token word must be right throughout)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Example:
    context: tuple[int, ...]  # the passage without its last word, with the tokenizer's BOS
    target: tuple[int, ...]   # " " + last word, no special tokens


def split_last_word(text: str) -> tuple[str, str]:
    """(context, last word) of a passage."""
    parts = text.strip().rsplit(maxsplit=1)
    if len(parts) != 2:
        raise ValueError(f"a Lambada passage needs at least two words, got {text!r}")
    return parts[0], parts[1]


def build_examples(texts: list[str], tokenizer) -> list[Example]:
    """Tokenize passages into (context, target) pairs."""
    out = []
    for text in texts:
        context, word = split_last_word(text)
        ctx = tokenizer(context)["input_ids"]
        tgt = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not tgt:
            raise ValueError(f"the tokenizer gives no tokens for the last word {word!r}")
        out.append(Example(tuple(ctx), tuple(tgt)))
    return out


def left_pad(rows: list[list[int]], pad_id: int) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=np.int64)


def evaluate(examples: list[Example], logits_fn: LogitsFn, batch_size: int = 8,
             pad_id: int = 1) -> dict:
    """Accuracy over `examples`, feeding `logits_fn` left-padded batches of context + target[:-1]."""
    if not examples:
        raise ValueError("no Lambada examples to evaluate")
    correct, predicted = [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        rows = [list(e.context) + list(e.target[:-1]) for e in batch]
        inputs = left_pad(rows, pad_id)
        logits = logits_fn(inputs)  # (n, seq, vocab)
        for i, (ex, row) in enumerate(zip(batch, rows)):
            first = inputs.shape[1] - len(row) + len(ex.context) - 1  # predicts target[0]
            picks = logits[i, first:first + len(ex.target)].argmax(-1)
            correct.append(bool(np.array_equal(picks, np.array(ex.target))))
            predicted.append([int(p) for p in picks])
    return {"task": "lambada", "accuracy": float(np.mean(correct)), "correct": int(sum(correct)),
            "total": len(correct), "predicted": predicted}
