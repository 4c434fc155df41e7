"""LLM (the Python text API) against transformers: each prompt's greedy completion, in a batch of
mixed lengths under several policies, equals transformers' greedy generation on that prompt alone
(float32, token-identical); eos ids and stop strings end completions with their finish reasons;
sampling with a seed repeats."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from flexgen_repro import LLM, Policy
from flexgen_repro.cost_model.search import SearchSpace
from flexgen_repro.text.model import block_cap, fit_block
from text_checkpoint import corpus_lines, hf_greedy_text, make_text_checkpoint

GEN = 8
# (percent, gpu_batch_size, num_gpu_batches, cpu_cache_compute): all on the GPU tier with two GPU
# batches; weights, cache and activations in host memory with attention there; disk for all three
POLICIES = {
    "gpu": ((100, 0, 100, 0, 100, 0), 2, 2, False),
    "cpu-attention": ((0, 100, 0, 100, 0, 100), 3, 2, True),
    "disk": ((0, 30, 0, 50, 0, 50), 2, 1, False),
}


def make_policy(name: str) -> Policy:
    pct, b, k, cpu = POLICIES[name]
    return Policy(gpu_batch_size=b, num_gpu_batches=k, w_gpu_percent=pct[0], w_cpu_percent=pct[1],
                  cache_gpu_percent=pct[2], cache_cpu_percent=pct[3], act_gpu_percent=pct[4],
                  act_cpu_percent=pct[5], cpu_cache_compute=cpu)


def mixed_prompts(n: int = 11) -> list[str]:
    """Prompts of 1 to about 40 tokens (not a multiple of any block size above)."""
    lines = corpus_lines()
    return [lines[i % len(lines)][: 1 + (i * 53) % 160] for i in range(n)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_text_checkpoint(str(tmp_path_factory.mktemp("text") / "tiny-text"))


@pytest.fixture(scope="module")
def expected(ckpt):
    return hf_greedy_text(ckpt, mixed_prompts(), GEN)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_greedy_equals_transformers_per_prompt(ckpt, expected, tmp_path, name):
    with LLM(ckpt, path=str(tmp_path / "w"), policy=make_policy(name), dtype="float32",
             offload_dir=str(tmp_path / "off")) as llm:
        out = llm.generate(mixed_prompts(), max_new_tokens=GEN)
        assert llm.stats.blocks > 1  # several blocks, the last one partial
    assert [c.token_ids for c in out] == expected
    assert all(c.finish_reason == "length" for c in out)
    assert [c.prompt_tokens for c in out] == [len(t) for t in llm.tokenize(mixed_prompts())]


def test_auto_policy_and_real_token_equal_to_pad_id(ckpt, tmp_path):
    """A prompt holding the pad id as a real token ("<pad>" is id 1): padding comes from the
    mask, not the id, so it is attended to as transformers attends to it unpadded."""
    prompts = ["<pad> The river <pad> was high", "A", "Tom lost his keys in the garden <pad>"]
    with LLM(ckpt, path=str(tmp_path / "w"), policy="auto", dtype="float32") as llm:
        assert 1 in llm.tokenize(prompts)[0][1:]
        out = llm.generate(prompts, max_new_tokens=GEN)
        # one block for the three prompts, padded by less than a row per GPU batch
        assert 3 <= llm.policy.block_size < 3 + llm.policy.num_gpu_batches
    assert [c.token_ids for c in out] == hf_greedy_text(ckpt, prompts, GEN)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the default dtype is float16")
def test_default_dtype_without_a_gpu_is_float32(ckpt, expected, tmp_path):
    """No dtype given and no GPU: float32 (16-bit matmuls on a CPU are slower and round), so the
    completions are transformers' float32 ones."""
    with LLM(ckpt, path=str(tmp_path / "w"), policy=make_policy("gpu")) as llm:
        assert llm.config.torch_dtype == torch.float32
        out = llm.generate(mixed_prompts(), max_new_tokens=GEN)
    assert [c.token_ids for c in out] == expected


def test_block_cap_and_fit_block():
    """The search for n prompts goes up to the smallest GPU batch size holding them, else the
    smallest block, else the space's largest; the pick's block then shrinks to the prompts with
    as few GPU batches as its batch size allows, rows shared evenly."""
    space = SearchSpace()
    assert [block_cap(n, space) for n in (1, 3, 8, 9, 600, 9000)] == [1, 4, 8, 12, 640, 8192]
    # 600: past the largest GPU batch (512); 640 = 80 x 8 is the smallest block holding it

    def shape(b, k, prompts):
        fitted = fit_block(Policy(
            gpu_batch_size=b, num_gpu_batches=k, w_gpu_percent=100, w_cpu_percent=0,
            cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0),
            prompts)
        return fitted.gpu_batch_size, fitted.num_gpu_batches
    assert shape(192, 32, 8) == (8, 1)      # one GPU batch holds them
    assert shape(4, 3, 9) == (3, 3)         # three batches of four needed; nine rows in three
    assert shape(2, 2, 3) == (2, 2)
    assert shape(4, 2, 8) == (4, 2) and shape(4, 2, 20) == (4, 2)   # full or short: unchanged


def test_eos_ends_a_completion(ckpt, expected, tmp_path):
    """A copy of the checkpoint whose eos id is the third token greedy picks for one prompt: that
    prompt ends there ("eos", the id kept, its text left out), as in transformers; others too."""
    row = next(i for i, ids in enumerate(expected) if ids[2] not in ids[:2])
    eos = expected[row][2]
    other = str(tmp_path / "tiny-eos")
    shutil.copytree(ckpt, other)
    with open(os.path.join(other, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = eos
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(cfg, f)
    reference = hf_greedy_text(other, mixed_prompts(), GEN)
    with LLM(other, path=str(tmp_path / "w"), policy=make_policy("gpu"), dtype="float32") as llm:
        out = llm.generate(mixed_prompts(), max_new_tokens=GEN)
        assert out[row].text == llm.tokenizer.decode(expected[row][:2], skip_special_tokens=True)
    assert [c.token_ids for c in out] == reference
    assert out[row].token_ids == expected[row][:3] and out[row].finish_reason == "eos"
    assert all((c.finish_reason == "eos") == (eos in c.token_ids) for c in out)


def test_stop_string_ends_a_completion(ckpt, expected, tmp_path):
    """The stop string is the text of a greedy completion's fourth token: the text ends just
    before it, the ids end with the token that completed it, finish reason "stop"."""
    with LLM(ckpt, path=str(tmp_path / "w"), policy=make_policy("cpu-attention"), dtype="float32") as llm:
        full = [llm.tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
        stop = llm.tokenizer.decode(expected[0][3:4], skip_special_tokens=True)
        assert stop.strip()
        out = llm.generate(mixed_prompts(), max_new_tokens=GEN, stop=[stop, "\x00never"])
    for c, text, ids in zip(out, full, expected):
        cut = text.find(stop)
        if cut < 0:
            assert (c.text, c.token_ids, c.finish_reason) == (text, ids, "length")
            continue
        assert c.finish_reason == "stop" and c.text == text[:cut]
        assert c.token_ids == ids[:len(c.token_ids)] and 1 <= len(c.token_ids) <= len(ids)
        assert stop in llm.tokenizer.decode(c.token_ids) and \
            stop not in llm.tokenizer.decode(c.token_ids[:-1])
    assert out[0].finish_reason == "stop" and len(out[0].token_ids) <= 4


def test_sampling_with_a_seed_repeats(ckpt, expected, tmp_path):
    with LLM(ckpt, path=str(tmp_path / "w"), policy=make_policy("gpu"), dtype="float32") as llm:
        runs = [llm.generate(mixed_prompts(), max_new_tokens=GEN, temperature=1.0, seed=s)
                for s in (7, 7, 8)]
        # top_p this small keeps only the most likely id: sampling becomes greedy
        narrow = llm.generate(mixed_prompts(), max_new_tokens=GEN, temperature=1.0, top_p=1e-6, seed=1)
    ids = [[c.token_ids for c in run] for run in runs]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]
    assert ids[0] != expected  # it sampled
    assert [c.token_ids for c in narrow] == expected


def test_bad_arguments_are_named(ckpt, tmp_path):
    from flexgen_repro.llm import TextJobError
    with pytest.raises(TextJobError, match="dtype"):
        LLM(ckpt, dtype="int8")
    with pytest.raises(TextJobError, match="tokenizer"):
        LLM("opt-tiny", path="_DUMMY_")
    with LLM(ckpt, path=str(tmp_path / "w"), policy=make_policy("gpu"), dtype="float32") as llm:
        with pytest.raises(TextJobError, match="prompt 1 has .* tokens"):
            llm.generate(["short", "word " * 200], max_new_tokens=GEN)
        assert not os.path.exists(tmp_path / "w")  # checked before any weight was prepared
        assert llm.generate([], max_new_tokens=GEN) == []


def test_finished_gpu_batches_skip_decode(ckpt, tmp_path):
    """OptLM.generate with eos ids: a GPU batch decodes token i only while one of its rows is
    still going (counted at the first layer), and ended rows hold pad ids; the ids equal
    transformers' greedy generation with the same eos, row by row."""
    from flexgen_repro import ExecutionEnv, OptLM
    from flexgen_repro.options import RuntimeOptions
    from flexgen_repro.text.batching import make_blocks
    from flexgen_repro.text.model import model_config
    config = model_config(ckpt, dtype="float32")
    with LLM(ckpt, path=str(tmp_path / "w"), policy=make_policy("gpu"), dtype="float32") as llm:
        llm.generate(["warm"], max_new_tokens=1)  # prepares the weight folder
        ids = llm.tokenize(mixed_prompts()[:4])
    block = make_blocks(ids, 4, config.pad_token_id, 64)[0]
    rows = [mixed_prompts()[i] for i in block.index]
    eos = {ids[0] for ids in hf_greedy_text(ckpt, rows[:2], 1)}  # batch 0 ends at its first token
    other = str(tmp_path / "tiny-eos")
    shutil.copytree(ckpt, other)
    reference = []
    for eos_id in sorted(eos):  # transformers' generate takes one eos per run here: end at either
        with open(os.path.join(other, "config.json")) as f:
            cfg = json.load(f)
        cfg["eos_token_id"] = eos_id
        with open(os.path.join(other, "config.json"), "w") as f:
            json.dump(cfg, f)
        reference.append(hf_greedy_text(other, rows, GEN))
    ends = [min([r.index(e) for r, e in zip((ref[row] for ref in reference), sorted(eos))
                 if e in r] or [GEN - 1]) for row in range(4)]
    calls: list[tuple[int, int]] = []
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        # eager decode: calls are counted in Python (CUDA graphs replay without calling it; their
        # skipping of ended batches is the same live_batches check)
        lm = OptLM(config, env, str(tmp_path / "w"), make_policy("gpu"),
                   RuntimeOptions(cuda_graphs=False))
        embed, forward = lm.layers[0], lm.layers[0].forward

        def counted(x, w, step, cache=None):
            calls.append(step.i)
            return forward(x, w, step, cache)
        embed.forward = counted
        out = lm.generate(block.ids, GEN, attention_mask=block.mask, eos_token_ids=eos)
    batch_end = [max(ends[:2]), max(ends[2:])]
    assert batch_end[0] == 0 < batch_end[1]
    expected_calls = [sum(i <= e for e in batch_end) for i in range(max(batch_end) + 1)]
    assert [calls.count(i) for i in range(GEN)] == expected_calls + [0] * (GEN - len(expected_calls))
    for row in range(4):
        gen = out[row, block.prompt_len:]
        assert list(gen[:ends[row] + 1]) == reference[0][row][:ends[row] + 1]
        assert (gen[ends[row] + 1:] == config.pad_token_id).all()


def test_cache_capacity_hand_worked():
    """Two lengths per doubling for a GPU-resident cache, eight otherwise, never above the planned
    top unless the block needs more, never below the need; block widths are multiples of 8."""
    from flexgen_repro.text.batching import bucket, cache_capacity
    assert [cache_capacity(n, 544, 2) for n in (9, 40, 64, 65, 97, 129, 300, 544, 600)] == \
        [16, 48, 64, 96, 128, 192, 384, 544, 600]
    assert [cache_capacity(n, 544, 8) for n in (65, 97, 129, 300, 520)] == [72, 104, 144, 320, 544]
    assert [bucket(n, 60) for n in (1, 8, 9, 57, 59, 70)] == [8, 8, 16, 60, 60, 70]


@pytest.mark.parametrize("name", ["gpu", "disk"])
def test_shorter_block_reuses_a_longer_cache(ckpt, tmp_path, name):
    """OptLM.generate with `cache_len`: a short block run on the cache homes a longer block left
    (the same objects, its positions stale) generates exactly transformers' greedy ids; the
    stale positions are masked like unwritten ones. A shorter cache length on a GPU cache runs
    on views of the held homes' first positions (same memory); elsewhere it gets homes of its own."""
    from flexgen_repro import ExecutionEnv, OptLM
    from flexgen_repro.text.batching import make_blocks
    from flexgen_repro.text.model import model_config
    config = model_config(ckpt, dtype="float32")
    with LLM(ckpt, path=str(tmp_path / "w"), policy=make_policy(name), dtype="float32",
             offload_dir=str(tmp_path / "off")) as llm:
        llm.generate(["warm"], max_new_tokens=1)  # prepares the weight folder
        ids = llm.tokenize(mixed_prompts())
    size = make_policy(name).block_size
    blocks = make_blocks(ids, size, config.pad_token_id, 64)
    long, short = blocks[0], blocks[-1]
    assert long.prompt_len > short.prompt_len
    cache_len = long.prompt_len + GEN
    prompts = [mixed_prompts()[i] for i in short.index]
    want = hf_greedy_text(ckpt, prompts, GEN)
    with ExecutionEnv.create(str(tmp_path / "off2")) as env:
        lm = OptLM(config, env, str(tmp_path / "w"), make_policy(name))
        lm.generate(long.ids, GEN, attention_mask=long.mask, cache_len=cache_len)
        homes = dict(lm.block_state["homes"])
        out = lm.generate(short.ids, GEN, attention_mask=short.mask, cache_len=cache_len)
        assert lm.block_state["home_len"] == cache_len and lm.block_state["homes"] == homes
        assert all(h[0] is homes[key][0] for key, h in lm.block_state["homes"].items())
        assert [list(row[short.prompt_len:]) for row in out] == want
        # a shorter cache length: views of the held homes on the GPU, new homes on disk
        out = lm.generate(short.ids, GEN, attention_mask=short.mask, cache_len=short.prompt_len + GEN)
        assert [list(row[short.prompt_len:]) for row in out] == want
        kept = lm.block_state["homes"] == homes
        assert kept == (name == "gpu")
        assert lm.block_state["home_len"] == (cache_len if name == "gpu" else short.prompt_len + GEN)
        lm.release_cache()
        assert lm.block_state == {}


def test_cache_prefix_is_a_view():
    """RowSplit.prefix: the first positions of an in-memory tensor, sharing its memory."""
    import torch
    from flexgen_repro import ExecutionEnv
    with ExecutionEnv.create(None) as env:
        t = env.mixed.alloc((4, 2, 10, 3), torch.float32, (0, 100, 0), seq_dim=2, zero=True)
        short = t.prefix(6)
        assert short.shape == (4, 2, 6, 3)
        short.write(5, torch.ones(4, 2, 1, 3))
        full = t.read_all(10, torch.device("cpu"))
        assert full[:, :, 5].eq(1).all() and full.sum() == 4 * 2 * 3
        assert short.read_all(6, torch.device("cpu")).equal(full[:, :, :6])
        disk = env.mixed.alloc((4, 2, 10, 3), torch.float32, (0, 0, 100), seq_dim=2, zero=True)
        with pytest.raises(ValueError, match="in-memory"):
            disk.prefix(6)


def test_a_one_segment_cache_hands_out_its_home_buffer():
    """RowSplit.buffer: the home itself (what decode attends and writes in place); a compressed
    home as a CompressedTensor over its packed components."""
    import torch
    from flexgen_repro import ExecutionEnv
    from flexgen_repro.compression import decompress
    from flexgen_repro.policy import CompressionConfig
    with ExecutionEnv.create(None) as env:
        t = env.mixed.alloc((4, 2, 10, 8), torch.float32, (100, 0, 0), seq_dim=2, zero=True)
        buf = t.buffer()
        buf[:, :, 3] = 2.0
        assert t.read_all(10, torch.device("cpu"))[:, :, 3].eq(2).all()
        comp = CompressionConfig(num_bits=4, group_size=4, group_dim=3)
        packed = env.mixed.alloc((4, 2, 10, 8), torch.float32, (100, 0, 0), compression=comp,
                                 seq_dim=2, zero=True)
        values = torch.rand(4, 2, 10, 8)
        packed.write(0, values)
        assert decompress(packed.buffer()).equal(packed.read_all(10, torch.device("cpu")))
        split = env.mixed.alloc((4, 2, 10, 8), torch.float32, (50, 50, 0), seq_dim=2, zero=True)
        with pytest.raises(ValueError):
            split.buffer()


def test_windows_of_growing_and_shrinking_lengths_share_the_gpu_cache(ckpt, expected, tmp_path):
    """Calls of one LLM (as `invoke generate` runs its windows): a GPU-held cache grows to the
    longest cache length asked for and is kept; shorter calls run on views of it. Each call's
    completions equal transformers' greedy ones."""
    prompts = mixed_prompts()
    with LLM(ckpt, policy=make_policy("gpu"), dtype="float32") as tok:
        lengths = [len(t) for t in tok.tokenize(prompts)]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    windows = [order[:4], order[-4:], order[4:7]]          # short, then the longest, then middle
    with LLM(ckpt, path=str(tmp_path / "w"), policy=make_policy("gpu"), dtype="float32",
             offload_dir=str(tmp_path / "off")) as llm:
        held = []
        for window in windows:
            out = llm.generate([prompts[i] for i in window], max_new_tokens=GEN)
            assert [c.token_ids for c in out] == [expected[i] for i in window]
            state = llm._lm.block_state
            held.append((state["home_len"], dict(state["homes"])))
        (short_len, short), (long_len, long), (mid_len, mid) = held
        assert short_len < long_len == mid_len          # grown once, then kept
        assert all(mid[key] is long[key] for key in long)  # the same homes, not new ones


def test_without_a_gpu_the_tiers_share_host_memory(monkeypatch, tmp_path):
    """Without CUDA the "GPU" tier is host memory too: a profile measured here and the text job's
    cost-model pick count the available memory once (the shipped profile's 15 + 204 GiB would let
    a long job's pick outgrow this machine), the GPU tier taking HOST_ONLY_GPU_SHARE of it. With
    one, the pick's tiers are no larger than this machine's either."""
    import types
    from flexgen_repro.config import get_opt_config
    from flexgen_repro.cost_model import profile
    from flexgen_repro.cost_model.hardware import load_profile
    from flexgen_repro.cost_model.predict import evaluate_policy
    from flexgen_repro.text.model import auto_policy
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(profile.psutil, "virtual_memory",
                        lambda: types.SimpleNamespace(available=10 * gib, total=16 * gib))
    usable = 10 * gib * profile.CPU_HEADROOM
    m = profile.measure_memory(str(tmp_path), None)
    assert m["gpu_mem"] == pytest.approx(usable * profile.HOST_ONLY_GPU_SHARE)
    assert m["gpu_mem"] + m["cpu_mem"] == pytest.approx(usable)
    config = get_opt_config("opt-1.3b", dtype=np.float32)
    unbounded = evaluate_policy(config, _t4_pick(config), load_profile("t4-paper"), 512, 256)
    assert sum(unbounded.peak_memory[t] for t in ("gpu", "cpu")) > usable   # would not fit here
    pick = auto_policy(config, 512, 256, 2000, "t4-paper")
    peaks = evaluate_policy(config, pick, load_profile("t4-paper"), 512, 256).peak_memory
    assert peaks["gpu"] <= m["gpu_mem"] and peaks["cpu"] <= m["cpu_mem"]
    # with a GPU (of 4 GiB here), neither tier larger than this machine's: the host's 8 usable
    # GiB, not the profile's 204
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (4 * gib, 4 * gib))
    peaks = evaluate_policy(config, auto_policy(config, 512, 256, 2000, "t4-paper"),
                            load_profile("t4-paper"), 512, 256).peak_memory
    assert peaks["gpu"] <= 4 * gib and peaks["cpu"] <= usable


def _t4_pick(config):
    """The shipped t4-paper profile's own pick, with its own memory sizes."""
    from flexgen_repro.cost_model.hardware import load_profile
    from flexgen_repro.cost_model.search import best_policy
    return best_policy(config, load_profile("t4-paper"), 512, 256).policy
