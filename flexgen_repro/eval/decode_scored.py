"""Perplexity scored through decode steps, so a compressed KV cache is read while scoring.

`wikitext.evaluate` scores every position in one prefill, whose attention reads the fresh keys
and values: a 4-bit cache never enters it. Here the first `prefix` tokens are the prompt and every
later token is teacher-forced through the runtime's decode steps: the step that predicts token t
attends over the stored cache of tokens < t (compressed where the policy compresses it), and the
runtime is then fed token t itself rather than its own pick.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def decode_scored_perplexity(lm, token_ids, prefix: int = 8) -> dict:
    """Perplexity of tokens[prefix:] given everything before them, each predicted by one step
    (the first by the prefill, the rest by decode steps over the cache), through `lm` (an OptLM
    whose policy holds one prompt per block)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if not 1 <= prefix < len(ids):
        raise ValueError(f"prefix must be in 1..{len(ids) - 1}, got {prefix}")
    if lm.policy.block_size != 1:
        raise ValueError("decode_scored_perplexity needs a policy with gpu_batch_size 1 and "
                         f"num_gpu_batches 1, got a block of {lm.policy.block_size}")
    targets = torch.from_numpy(ids[prefix:])
    nll = [0.0]

    def forced(logits: torch.Tensor) -> torch.Tensor:
        """Score the step's target, then feed it (not the argmax) to the next step."""
        i = forced.step
        forced.step += 1
        logp = torch.log_softmax(logits[0].double().cpu(), -1)
        nll[0] -= float(logp[targets[i]])
        return targets[i].view(1).to(logits.device)
    forced.step = 0
    lm._run_block(ids[None, :prefix], len(targets), forced, None)
    count = len(targets)
    return {"perplexity": math.exp(nll[0] / count), "nll": nll[0], "tokens": count, "prefix": prefix,
            "scored_by": "decode steps (teacher-forced), the KV cache read at every step"}
