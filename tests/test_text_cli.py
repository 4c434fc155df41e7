"""The text job's command line: completions equal transformers' greedy generation on each prompt
alone under three policies (one with disk), through `python -m flexgen_repro.generate`'s entry
point and `invoke generate`; a run killed with SIGKILL and resumed writes the same bytes as an
uninterrupted one; a torn last line is cut away; bad input exits 2 with a message before any
weight loads."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flexgen_repro.generate import main
from test_text_llm import POLICIES
from text_checkpoint import corpus_lines, hf_greedy_text, make_text_checkpoint

GEN = 6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def policy_flags(name: str) -> list[str]:
    pct, b, k, cpu = POLICIES[name]
    flags = ["--percent", *map(str, pct), "--gpu-batch-size", str(b), "--num-gpu-batches", str(k)]
    return flags + (["--cpu-cache-compute"] if cpu else [])


def write_input(path, n: int, start: int = 0) -> list[dict]:
    lines = corpus_lines()
    records = [{"prompt": lines[i % len(lines)][: 1 + (i * 41) % 150].strip() or "The",
                "id": f"doc-{i}", "k": i}
               for i in range(start, start + n)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("textcli")
    ckpt = make_text_checkpoint(str(root / "tiny-text"))
    records = write_input(root / "in.jsonl", 13)
    expected = hf_greedy_text(ckpt, [r["prompt"] for r in records], GEN)
    return root, ckpt, records, expected


def base_args(root, ckpt, out, *extra) -> list[str]:
    return ["--model", ckpt, "--path", str(root / "w"), "--input", str(root / "in.jsonl"),
            "--output", str(out), "--dtype", "float32", "--max-new-tokens", str(GEN),
            "--offload-dir", str(root / "off"), *extra]


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_output(path, records, expected, tokenizer_dir) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    out = read_jsonl(path)
    assert [o["id"] for o in out] == [r["id"] for r in records]
    for o, r, ids in zip(out, records, expected):
        assert o["prompt"] == r["prompt"] and o.get("k") == r.get("k")
        assert o["completion"] == tok.decode(ids, skip_special_tokens=True)
        assert (o["completion_tokens"], o["finish_reason"]) == (len(ids), "length")
        assert o["prompt_tokens"] == len(tok(r["prompt"])["input_ids"])


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cli_matches_transformers(job, tmp_path, name):
    root, ckpt, records, expected = job
    out = tmp_path / "out.jsonl"
    assert main(base_args(root, ckpt, out, *policy_flags(name))) == 0
    check_output(out, records, expected, ckpt)
    run = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    assert run["prompts"] == len(records) and run["weights"] == str(root / "w")
    assert run["generated_tokens"] == sum(map(len, expected))
    assert run["percent"] == list(POLICIES[name][0]) and run["commit"]


def test_invoke_generate_and_text_input(job, tmp_path):
    """`invoke generate` on a .txt file (one prompt per line, ids are line numbers)."""
    root, ckpt, records, expected = job
    txt = tmp_path / "in.txt"
    txt.write_text("".join(r["prompt"] + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        ["invoke", "generate", "--model", ckpt, "--path", str(root / "w"), "--input", str(txt),
         "--output", str(out), "--dtype", "float32", "--max-new-tokens", str(GEN),
         "--percent", " ".join(policy_flags("gpu")[1:7]), "--gpu-batch-size", "2",
         "--num-gpu-batches", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "generate: 13 prompts" in done.stderr
    check_output(out, [{"prompt": r["prompt"], "id": n} for n, r in enumerate(records, start=1)],
                 expected, ckpt)


def test_sigkill_then_resume_equals_uninterrupted(job, tmp_path):
    root, ckpt, _, _ = job
    inp = tmp_path / "many.jsonl"
    records = write_input(inp, 30)
    flags = ["--input", str(inp), *policy_flags("disk"), "--gpu-batch-size", "1", "--window", "4"]
    whole = tmp_path / "whole.jsonl"
    assert main(base_args(root, ckpt, whole, *flags)) == 0
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "flexgen_repro.generate",
                             *base_args(root, ckpt, out, *flags)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size > 0:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_bytes().count(b"\n")
    assert 0 < partial < len(records), "the job was not killed mid-way"
    assert main(base_args(root, ckpt, out, *flags, "--resume")) == 0
    assert out.read_bytes() == whole.read_bytes()


def test_torn_last_line_is_cut_away(job, tmp_path):
    root, ckpt, records, expected = job
    whole = tmp_path / "whole.jsonl"
    assert main(base_args(root, ckpt, whole, *policy_flags("gpu"))) == 0
    lines = whole.read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:4]) + lines[4][:17])
    assert main(base_args(root, ckpt, out, *policy_flags("gpu"), "--resume")) == 0
    assert out.read_bytes() == whole.read_bytes()
    run = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    assert (run["prompts"], run["resumed_after"]) == (len(records) - 4, 4)
    assert main(base_args(root, ckpt, out, *policy_flags("gpu"), "--resume")) == 0  # nothing left
    assert out.read_bytes() == whole.read_bytes()


def _bad_cases(root, ckpt):
    """(name, input file text or None, extra flags, words the message must hold)."""
    good = json.dumps({"prompt": "The ship left", "id": "a"}) + "\n"
    return [
        ("malformed", good + '{"prompt": "x"\n', [], ["line 2", "not valid JSON"]),
        ("no-prompt", good + '{"text": "x"}\n', [], ["line 2", '"prompt"']),
        ("prompt-not-string", good + '{"prompt": 5}\n', [], ["line 2", '"prompt"']),
        ("too-long", good + json.dumps({"prompt": "word " * 120, "id": "big"}) + "\n", [],
         ["'big'", "--truncate left"]),
        ("empty", "\n\n", [], ["no prompts"]),
        ("duplicate-id", good + good, [], ["'a'", "twice"]),
        ("unknown-model", good, ["--model", "opt-nonesuch"], ["unknown model"]),
        ("no-tokenizer", good, ["--model", "opt-tiny", "--path", "_DUMMY_"], ["tokenizer"]),
        ("tokenizer-folder-empty", good, ["--tokenizer", str(root)], ["tokenizer"]),
        ("bad-percent", good, ["--percent", "1", "2", "3"], ["six numbers"]),
        ("output-exists", good, ["EXISTS"], ["--resume", "--overwrite"]),
        ("window-zero", good, ["--window", "0"], ["--window must be >= 1"]),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_input_exits_2_before_weights_load(job, tmp_path, capsys, case):
    root, ckpt, _, _ = job
    name, text, extra, words = _bad_cases(tmp_path / "empty-folder", ckpt)[case]
    (tmp_path / "empty-folder").mkdir()
    inp = tmp_path / "in.jsonl"
    inp.write_text(text)
    out = tmp_path / "out.jsonl"
    if extra == ["EXISTS"]:
        out.write_text("kept\n")
        extra = []
    weights = tmp_path / "w"
    args = ["--model", ckpt, "--path", str(weights), "--input", str(inp), "--output", str(out),
            "--max-new-tokens", "50", "--percent", "100", "0", "100", "0", "100", "0", *extra]
    assert main(args) == 2, name
    err = capsys.readouterr().err
    assert err.startswith("generate: ") and all(w in err for w in words), err
    assert "Traceback" not in err
    assert not weights.exists()  # nothing prepared or loaded
    assert not out.exists() or out.read_text() == "kept\n"


def test_bad_input_on_the_command_line_has_no_traceback(job, tmp_path):
    root, ckpt, _, _ = job
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a"}\n{"prompt": \n')
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "flexgen_repro.generate", "--model", ckpt,
                           "--input", "-", "--output", str(tmp_path / "o.jsonl")],
                          stdin=open(inp), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "line 2 is not valid JSON" in done.stderr and "Traceback" not in done.stderr
    assert os.listdir(tmp_path) == ["in.jsonl"]  # the spooled copy of stdin is gone


def test_window_prompts_whole_blocks():
    from flexgen_repro.generate import window_prompts
    assert [window_prompts(n, 32) for n in (1, 128, 2048, 2050)] == [128, 128, 2048, 2048]
    assert window_prompts(10, 3) == 12  # at least four blocks


def test_truncate_left_keeps_the_tail(job, tmp_path):
    root, ckpt, _, _ = job
    long_prompt = " ".join(corpus_lines())[:600]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": long_prompt}) + "\n")
    out = tmp_path / "out.jsonl"
    args = base_args(root, ckpt, out, *policy_flags("gpu"), "--truncate", "left")
    args[args.index("--input") + 1] = str(inp)
    assert main(args) == 0
    (rec,) = read_jsonl(out)
    from transformers import AutoTokenizer, OPTForCausalLM
    import torch
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(long_prompt)["input_ids"][-(96 - GEN):]
    assert rec["prompt_tokens"] == 96 - GEN
    model = OPTForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=GEN, do_sample=False, pad_token_id=1)
    assert rec["completion"] == tok.decode(ref[0, len(ids):], skip_special_tokens=True)
