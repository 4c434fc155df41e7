"""Tiny random Llama-family models (Llama, Mistral, Qwen2) built with transformers for the tests,
and the runtime's greedy output beside transformers' for a left-padded mixed-length batch."""
from __future__ import annotations

import os

import numpy as np
import torch

VOCAB = 128
PAD = 0  # the tiny models' pad id: never drawn in prompts (random_prompts draws ids from 3 on)


def make_hf_llama(kind: str = "llama", hidden=32, layers=2, heads=4, kv_heads=4, inter=64, vocab=VOCAB,
                  seed=0, max_pos=64, tie=False, rope_scaling=None, window=None):
    """A random *ForCausalLM in float32 whose weights are exactly representable in fp16."""
    import transformers
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                  max_position_embeddings=max_pos, tie_word_embeddings=tie, pad_token_id=PAD,
                  bos_token_id=1, eos_token_id=None, rms_norm_eps=1e-5, attention_dropout=0.0)
    if rope_scaling is not None:
        common["rope_scaling"] = dict(rope_scaling)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=window, **common), transformers.MistralForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            # well separated random logits (no argmax ties), rounded through fp16 so the fp16
            # weight folder holds exactly these values
            p.copy_((p + torch.randn_like(p) * 0.05).half().float())
    return model


def save_and_prepare(model, root: str, name: str) -> tuple[str, str]:
    """(checkpoint folder, weight root): save_pretrained, then prepare-weights from it."""
    from flexgen_repro.weights import prepare
    ckpt, weights = os.path.join(root, name), os.path.join(root, "weights")
    model.save_pretrained(ckpt)
    assert prepare.main(model=ckpt, path=weights) == 0
    return ckpt, weights


def hf_rows_alone(model, prompts: np.ndarray, gen_len: int, pad: int = PAD) -> np.ndarray:
    """transformers' greedy output for each left-padded row run alone (its padding stripped),
    re-padded on the left to the batch's width."""
    rows = []
    for row in prompts:
        ids = torch.from_numpy(row[row != pad][None])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                                 do_sample=False, pad_token_id=pad)[0].numpy()
        rows.append(np.concatenate([np.full(prompts.shape[1] - len(ids[0]), pad), out]))
    return np.stack(rows)


def mixed_prompts(n: int, length: int, vocab: int = VOCAB, seed: int = 0) -> np.ndarray:
    """Random prompts (ids >= 3), rows left-padded by different amounts (row 0 is full length)."""
    rng = np.random.default_rng(seed)
    p = rng.integers(3, vocab, size=(n, length))
    for r in range(1, n):
        p[r, : (r * 2) % (length - 2)] = PAD
    return p
