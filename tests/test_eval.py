"""Lambada accuracy and WikiText perplexity (flexgen_repro.eval) against hand computations: a bigram
table whose exact answers are known, hand-made examples, float64 loops over transformers' OPT, and
the offloading runtime end to end on a tiny random OPT with a word-level tokenizer built here.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from conftest import make_hf_opt, save_weight_folder
from flexgen_repro import ExecutionEnv, OptLM, Policy, get_opt_config
from flexgen_repro.eval import cli, lambada, wikitext

PPL_TOL = 1e-6  # relative: float32 logits through a float64 log-softmax, sums of ~300 terms
HF_TOL = 1e-5   # relative: float32 model vs the same model in float64


def words_of(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer over the bundled fixtures: <s>=0, <pad>=1, </s>=2 (BOS), <unk>=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    text = cli.DEFAULT_DATA["wikitext"].read_text() + " ".join(cli.read_data("lambada", None))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for w in sorted(set(words_of(text))):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    folder = str(tmp_path_factory.mktemp("tok"))
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return cli.load_tokenizer("unused", tokenizer_dir)


def bigram_table(ids: list[int], vocab: int) -> np.ndarray:
    """log p(next | prev), add-one smoothed: a 'model' whose scores are known exactly."""
    counts = np.ones((vocab, vocab))
    for a, b in zip(ids[:-1], ids[1:]):
        counts[a, b] += 1
    return np.log(counts / counts.sum(1, keepdims=True))


def test_windows_cover_every_position_once():
    assert wikitext.windows(10, 4, 3) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    assert wikitext.windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, ctx, stride in [(37, 8, 3), (9, 16, 15), (50, 10, 9), (2, 2, 1)]:
        seen = [p for _, end, first in wikitext.windows(n, ctx, stride) for p in range(first, end)]
        assert seen == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        wikitext.windows(10, 4, 4)


@pytest.mark.parametrize("context_len,stride,batch", [(16, None, 1), (16, 5, 3), (64, 63, 2), (1000, None, 4)])
def test_perplexity_of_a_bigram_equals_the_hand_computation(tok, context_len, stride, batch):
    """A bigram sees its whole context in every window, so windowing, batching and left padding
    must give exactly the full-stream perplexity."""
    ids = tok(cli.read_data("wikitext", None))["input_ids"]
    table = bigram_table(ids, len(tok))
    expect = math.exp(-np.mean([table[a, b] for a, b in zip(ids[:-1], ids[1:])]))
    got = wikitext.evaluate(ids, lambda x: table[x].astype(np.float32), context_len, stride, batch)
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(expect, rel=PPL_TOL)


def test_lambada_with_a_bigram_equals_the_hand_count(tok):
    texts = cli.read_data("lambada", None)
    ids = [i for t in texts for i in tok(t)["input_ids"]]
    table = bigram_table(ids, len(tok))
    expect = 0
    for t in texts:  # word-level: the target is one token, predicted from the context's last one
        context, word = t.rsplit(maxsplit=1)
        expect += int(table[tok(context)["input_ids"][-1]].argmax() == tok.convert_tokens_to_ids(word))
    examples = lambada.build_examples(texts, tok)
    got = lambada.evaluate(examples, lambda x: table[x].astype(np.float32), batch_size=3)
    assert 0 < expect < len(texts)  # a mix of right and wrong, so the count means something
    assert (got["correct"], got["total"]) == (expect, len(texts))


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_lambada_multi_token_targets_must_be_right_throughout(batch):
    """A 'model' that always predicts token + 1: right, wrong at the second token, right."""
    examples = [lambada.Example((2, 5, 6), (7, 8)), lambada.Example((2, 9), (10, 12)),
                lambada.Example((2, 3, 4, 5, 6), (7,))]
    eye = np.eye(20, dtype=np.float32)
    got = lambada.evaluate(examples, lambda x: eye[(x + 1) % 20], batch_size=batch)
    assert (got["correct"], got["total"]) == (2, 3)


def hf_logits_fn(model):
    def fn(inputs: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(inputs)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=(ids != 1).long()).logits.float().numpy()
    return fn


@pytest.fixture(scope="module")
def tiny(tok, tmp_path_factory):
    """A random OPT over the tokenizer's vocabulary: (hf model, checkpoint dir, weight root)."""
    root = tmp_path_factory.mktemp("eval_opt")
    model = make_hf_opt(hidden=64, layers=2, heads=2, ffn=128, vocab=len(tok), max_pos=128, seed=3)
    ckpt = os.path.join(root, "eval-opt")
    model.save_pretrained(ckpt)
    save_weight_folder(model, str(root / "weights"), "eval-opt")
    return model, ckpt, str(root / "weights")


def test_perplexity_through_transformers_equals_a_float64_loop(tok, tiny):
    model = tiny[0]
    ids = tok(cli.read_data("wikitext", None))["input_ids"]
    got = wikitext.evaluate(ids, hf_logits_fn(model), 48, 20, batch_size=3)
    m64 = make_hf_opt(hidden=64, layers=2, heads=2, ffn=128, vocab=len(tok), max_pos=128, seed=3).double()
    nll = 0.0
    for begin, end, first in wikitext.windows(len(ids), 48, 20):  # one unpadded window at a time
        with torch.no_grad():
            logp = torch.log_softmax(m64(torch.tensor([ids[begin:end]])).logits[0], -1)
        nll -= sum(logp[p - 1 - begin, ids[p]].item() for p in range(first, end))
    assert got["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=HF_TOL)


def run_runtime(tiny, task, tok, **policy_kw):
    model, ckpt, weights = tiny
    config = get_opt_config(ckpt, dtype=np.float32)
    pol = Policy(gpu_batch_size=4, num_gpu_batches=1, w_gpu_percent=100, w_cpu_percent=0,
                 cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0,
                 **policy_kw)
    with ExecutionEnv.create(None) as env:
        lm = OptLM(config, env, weights, pol)
        return cli.run_task(task, tok, cli.read_data(task, None), lm.logits, batch_size=4,
                            context_len=48, stride=24)


# Measured on this fixture: 4-bit weights move the perplexity by 0.84% (226.02 -> 224.12); the
# bound leaves room for other seeds while still catching a broken quantizer (which sends the
# perplexity towards the vocabulary size, 177, or far past it).
COMPRESSED_PPL_REL = 0.1


def test_runtime_perplexity_matches_transformers_and_compression_moves_it_a_little(tok, tiny):
    ids = tok(cli.read_data("wikitext", None))["input_ids"]
    expect = wikitext.evaluate(ids, hf_logits_fn(tiny[0]), 48, 24, batch_size=4)
    plain = run_runtime(tiny, "wikitext", tok)
    assert plain["perplexity"] == pytest.approx(expect["perplexity"], rel=HF_TOL)
    weights = run_runtime(tiny, "wikitext", tok, compress_weight=True)
    change = abs(weights["perplexity"] / plain["perplexity"] - 1)
    assert 0 < change < COMPRESSED_PPL_REL
    # logits() scores every position in the prefill, whose attention reads the fresh K and V (as in
    # FlexGen); the compressed cache is read only by decode steps, so it cannot move these numbers
    cache = run_runtime(tiny, "wikitext", tok, compress_cache=True)
    assert cache["perplexity"] == plain["perplexity"]


def test_runtime_lambada_matches_transformers(tok, tiny):
    """Same predicted tokens for every passage (the random model gets none right, so compare
    predictions, not only the count)."""
    texts = cli.read_data("lambada", None)
    expect = lambada.evaluate(lambada.build_examples(texts, tok), hf_logits_fn(tiny[0]), 4)
    assert run_runtime(tiny, "lambada", tok) == expect


def test_cli_main_end_to_end(tok, tiny, tokenizer_dir, capsys, tmp_path):
    _, ckpt, weights = tiny
    out = tmp_path / "rec.json"
    code = cli.main("wikitext", ckpt, weights, tokenizer=tokenizer_dir, context_len=48,
                    batch_size=4, out=str(out))
    assert code == 0
    record = json.loads(out.read_text())
    assert "perplexity" in capsys.readouterr().out
    ids = tok(cli.read_data("wikitext", None))["input_ids"]
    expect = wikitext.evaluate(ids, hf_logits_fn(tiny[0]), 48, None, batch_size=4)
    # the CLI runs at the checkpoint's dtype (fp16): its rounding moves the perplexity slightly
    assert record["perplexity"] == pytest.approx(expect["perplexity"], rel=1e-2)
    assert cli.main("lambada", ckpt, weights, tokenizer=tokenizer_dir, limit=3) == 0
    assert '"total": 3' in capsys.readouterr().out


def test_cli_errors_name_the_fix(tiny, tokenizer_dir, tmp_path, capsys):
    _, ckpt, weights = tiny
    assert cli.main("hellaswag", ckpt, weights) == 2
    assert "--task must be one of lambada, wikitext" in capsys.readouterr().err
    assert cli.main("wikitext", ckpt, weights, data=str(tmp_path / "none.txt"),
                    tokenizer=tokenizer_dir) == 2
    assert "pass --data FILE" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    assert cli.main("lambada", ckpt, weights, data=str(bad), tokenizer=tokenizer_dir) == 2
    assert 'bad.jsonl:1 is not a JSON object with a "text" field' in capsys.readouterr().err


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once closed


def test_unreachable_hub_fails_at_once_without_a_network_attempt(monkeypatch, tmp_path, capsys):
    """No network: the tokenizer is looked up in the local cache only, then the error names the fix
    (--tokenizer DIR) instead of retrying the hub for tens of seconds."""
    import transformers
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(source, *args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert cli.main("lambada", "opt-125m", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "hub is unreachable" in err and "--tokenizer DIR" in err
    assert calls and all(calls), "only the local cache may be asked"


def test_hub_probe_honours_offline_and_finds_a_listening_endpoint(monkeypatch):
    import socket
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not cli.hub_reachable()
        monkeypatch.delenv("HF_HUB_OFFLINE")
        assert cli.hub_reachable()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert not cli.hub_reachable()
