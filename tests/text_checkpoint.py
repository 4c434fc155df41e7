"""A tiny random OPT checkpoint with a real byte-level BPE tokenizer, both made offline: the
tokenizer is trained here on the eval sample text, the model's vocabulary is the tokenizer's."""
from __future__ import annotations

import os

import torch

from conftest import make_hf_opt

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3: bos/eos is "</s>" (2), pad 1
VOCAB = 384
NOISE = 0.5


def corpus_lines() -> list[str]:
    from importlib import resources
    data = resources.files("flexgen_repro.eval") / "data"
    text = (data / "wikitext_sample.txt").read_text().splitlines()
    text += [line for line in (data / "lambada_sample.jsonl").read_text().splitlines()]
    return [t for t in text if t.strip()]


def train_tokenizer():
    """A byte-level BPE of VOCAB ids that prepends "</s>" to every text, as OPT's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_text_checkpoint(folder: str, eos: int | None = None, max_pos: int = 96) -> str:
    """Save the model (float32, fp16-exact weights) and tokenizer into `folder`; return it."""
    tok = train_tokenizer()
    model = make_hf_opt(vocab=len(tok), max_pos=max_pos, seed=3)
    with torch.no_grad():  # larger weights: varied completions (random OPTs repeat one token)
        for p in model.parameters():
            p.copy_((p + torch.randn_like(p) * NOISE).half().float())
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hf_greedy_text(folder: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy completion ids of each prompt alone (float32), ending at eos if any."""
    from transformers import AutoTokenizer, OPTForCausalLM
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = OPTForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    eos = model.config.eos_token_id
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=1, eos_token_id=eos)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def ensure(folder: str) -> str:
    if not os.path.exists(os.path.join(folder, "config.json")):
        make_text_checkpoint(folder)
    return folder
