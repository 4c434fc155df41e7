"""WikiText perplexity over one token stream, scored in windows of at most `context_len` tokens.

Windows start every `stride` tokens; each token is predicted once, by the first window that holds
it past that window's first position, so later windows see at least context_len - stride tokens of
earlier context ("sliding window"). The default stride, context_len - 1, is the fixed-context
evaluation: each window starts on the previous window's last token, so no token goes unscored. Perplexity = exp(total NLL / predicted tokens), the NLL
from float32 logits through a float64 log-softmax.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

LogitsFn = Callable[[np.ndarray], np.ndarray]


def windows(n_tokens: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first predicted position) of each window over a stream of n_tokens."""
    if not 1 <= stride < context_len:
        raise ValueError(f"stride must be in 1..context_len - 1 = {context_len - 1} (a window's "
                         f"first token has no context, so windows must overlap), got {stride}")
    if context_len < 2 or n_tokens < 2:
        raise ValueError(f"perplexity needs context_len >= 2 and at least 2 tokens, got "
                         f"context_len={context_len}, {n_tokens} tokens")
    out, done = [], 1  # position 0 is never predicted
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context_len, n_tokens)
        out.append((begin, end, max(done, begin + 1)))
        done = end
        if end == n_tokens:
            break
    return out


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def evaluate(token_ids, logits_fn: LogitsFn, context_len: int, stride: int | None = None,
             batch_size: int = 4, pad_id: int = 1, limit: int | None = None) -> dict:
    """Perplexity of `token_ids` (1-D) under `logits_fn`, over at most `limit` windows."""
    ids = np.asarray(token_ids, dtype=np.int64)
    stride = stride or context_len - 1
    spans = windows(len(ids), context_len, stride)[:limit]
    nll, count = 0.0, 0
    for start in range(0, len(spans), batch_size):
        batch = spans[start:start + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        inputs = np.full((len(batch), width), pad_id, dtype=np.int64)
        for i, (begin, end, _) in enumerate(batch):
            inputs[i, width - (end - begin):] = ids[begin:end]
        logp = _log_softmax64(logits_fn(inputs))
        for i, (begin, end, first) in enumerate(batch):
            shift = width - (end - begin) - begin  # input column of stream position p is p + shift
            pos = np.arange(first, end)
            nll -= logp[i, pos - 1 + shift, ids[pos]].sum()
            count += len(pos)
    return {"task": "wikitext", "perplexity": math.exp(nll / count), "nll": nll, "tokens": count,
            "windows": len(spans), "context_len": context_len, "stride": stride}
