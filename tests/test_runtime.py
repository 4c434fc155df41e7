"""The offloading runtime against transformers' OPTForCausalLM: token-identical greedy output at
float32 under a matrix of policies (every tier and split for weights, cache and activations, both
layer granularities, all three schedules, CPU attention, several GPU batches, left padding and a
prompt count that is not a multiple of the block)."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from conftest import hf_greedy, hf_logits, random_prompts
from flexgen_repro import ExecutionEnv, OptLM, Policy, get_opt_config
from flexgen_repro.options import RuntimeOptions

GEN = 6
# (w_gpu, w_cpu, cache_gpu, cache_cpu, act_gpu, act_cpu): each tier alone and split, for each kind
PLACEMENTS = [
    (100, 0, 100, 0, 100, 0),   # all on GPU
    (0, 100, 0, 100, 0, 100),   # all on CPU
    (0, 0, 0, 0, 0, 0),         # all on disk
    (30, 30, 30, 30, 30, 30),   # everything split three ways
    (50, 50, 0, 50, 50, 0),     # cache split CPU/disk, activations split GPU/disk
    (0, 50, 50, 0, 0, 100),     # weights CPU/disk, cache GPU/disk
    (20, 80, 0, 100, 0, 100),   # the paper's OPT-30B policy
]
SCHEDULES = [  # (overlap, num_gpu_batches): normal, single-batch overlap, multi-batch overlap
    (False, 1), (False, 3), (True, 1), (True, 3),
]


def policy(pct, overlap=True, num_gpu_batches=1, gpu_batch_size=2, **kw) -> Policy:
    return Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches,
                  w_gpu_percent=pct[0], w_cpu_percent=pct[1], cache_gpu_percent=pct[2],
                  cache_cpu_percent=pct[3], act_gpu_percent=pct[4], act_cpu_percent=pct[5],
                  overlap=overlap, **kw)


@pytest.fixture(scope="module")
def setup(tiny_opt):
    model, ckpt, weights = tiny_opt
    config = get_opt_config(ckpt, dtype=np.float32)
    prompts = random_prompts(7, 9, config.vocab_size, seed=1, pad_rows=4)  # 7: not a block multiple
    return model, config, weights, prompts, hf_greedy(model, prompts, GEN)


def generate(config, weights, pol, prompts, tmp_path, **kw):
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, pol)
        return lm.generate(prompts, max_new_tokens=GEN, **kw)


CASES = list(itertools.product(range(len(PLACEMENTS)), range(len(SCHEDULES))))


@pytest.mark.parametrize("placement,schedule", CASES)
def test_greedy_matches_transformers(setup, tmp_path, placement, schedule):
    model, config, weights, prompts, expected = setup
    overlap, k = SCHEDULES[schedule]
    pct = PLACEMENTS[placement]
    # alternate the switches over the matrix so each meets every placement and schedule
    sep_layer = (placement + schedule) % 2 == 0
    cpu_attn = pct[2] < 100 and schedule % 2 == 1
    pol = policy(pct, overlap, k, sep_layer=sep_layer, cpu_cache_compute=cpu_attn)
    out = generate(config, weights, pol, prompts, tmp_path)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("cpu_attn", [False, True])
@pytest.mark.parametrize("sep_layer", [False, True])
def test_split_cache_with_cpu_attention(setup, tmp_path, cpu_attn, sep_layer):
    """A cache split over all three tiers, attention on the CPU for the CPU and disk rows
    (the original rejects this placement)."""
    model, config, weights, prompts, expected = setup
    pol = policy((40, 30, 34, 33, 50, 25), True, 2, gpu_batch_size=3,
                 cpu_cache_compute=cpu_attn, sep_layer=sep_layer)
    np.testing.assert_array_equal(generate(config, weights, pol, prompts, tmp_path), expected)


def test_cpu_attention_through_the_host_stage_matches_transformers(setup, tmp_path):
    """CPU attention overlapped over several GPU batches, its results back through the pinned
    slots of devices/host_stage.py."""
    model, config, weights, prompts, expected = setup
    pol = policy((20, 80, 0, 100, 0, 100), True, 3, cpu_cache_compute=True)
    np.testing.assert_array_equal(generate(config, weights, pol, prompts, tmp_path), expected)


@pytest.mark.parametrize("compress", [False, True])
def test_unpinned_weights_match_transformers(setup, tmp_path, monkeypatch, compress):
    """`--pin-weight false`: host weights stay pageable; on CUDA they cross through the pinned
    staging blocks (every weight here, with the size floor lowered; in pieces of 4 KiB, so the
    blocks are refilled many times per layer). Weights split over host and disk, both schedules.
    On the CPU nothing is staged."""
    from flexgen_repro.devices import copy_engine
    model, config, weights, prompts, expected = setup
    for overlap, k in ((False, 1), (True, 2)):
        pol = policy((0, 70, 100, 0, 100, 0), overlap, k, pin_weight=False, compress_weight=compress)
        with monkeypatch.context() as m:
            m.setattr(copy_engine, "STAGE_MIN_BYTES", 1)
            m.setattr(copy_engine, "STAGE_CHUNK_BYTES", 4096)
            out = generate(config, weights, pol, prompts, tmp_path)
        if compress:   # 4-bit weights change the tokens: the tiny weights unstaged are the reference
            ref = generate(config, weights, pol, prompts, tmp_path)
            np.testing.assert_array_equal(out, ref)
        else:
            np.testing.assert_array_equal(out, expected)


def test_whole_copies_only_where_no_small_copies_wait():
    from flexgen_repro import schedule
    assert schedule.whole_copies(policy((0, 100, 100, 0, 100, 0)))        # case D
    assert not schedule.whole_copies(policy((20, 80, 0, 100, 0, 100),     # case C
                                                   cpu_cache_compute=True))
    assert not schedule.whole_copies(policy((0, 100, 100, 0, 0, 100)))    # host activations
    assert schedule.whole_copies(policy((0, 100, 50, 50, 100, 0)))        # host cache: own channel
    assert not schedule.whole_copies(policy((0, 100, 50, 30, 100, 0)))    # cache partly on disk


@pytest.mark.parametrize("act", [(100, 0), (0, 100)], ids=["whole", "pieces"])
def test_host_cache_loads_whole_or_in_pieces_match_transformers(setup, tmp_path, monkeypatch, act):
    """A cache in host memory loads as whole copies where the policy makes no small copies
    (activations on the GPU), in pieces otherwise (host activations), 4-bit or not; the tokens
    are transformers' either way."""
    from flexgen_repro import schedule
    from flexgen_repro.devices import copy_engine
    model, config, weights, prompts, expected = setup
    seen = []
    to_device = copy_engine.CopyEngine.to_device

    def spy(self, t, device, whole=False):
        seen.append(whole)
        return to_device(self, t, device, whole)
    monkeypatch.setattr(copy_engine.CopyEngine, "to_device", spy)
    monkeypatch.setattr(copy_engine, "COPY_CHUNK_BYTES", 4096)
    for compress in (False, True):
        pol = policy((100, 0, 0, 100) + act, True, 2, compress_cache=compress)
        whole = schedule.whole_copies(pol)
        assert whole == (act[0] == 100)
        seen.clear()
        out = generate(config, weights, pol, prompts, tmp_path)
        assert seen and set(seen) == {whole}     # every host->device copy: the cache's loads
        if not compress:
            np.testing.assert_array_equal(out, expected)
        else:   # 4-bit cache: the same tokens whether its loads are whole or pieced
            monkeypatch.setattr(copy_engine.CopyEngine, "to_device", to_device)
            ref = generate(config, weights, policy((100, 0, 0, 100) + act, False, 1,
                                                   compress_cache=True), prompts, tmp_path)
            monkeypatch.setattr(copy_engine.CopyEngine, "to_device", spy)
            np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("act", [(100, 0), (0, 100)], ids=["whole", "pieces"])
def test_whole_or_pieced_weight_copies_match_transformers(setup, tmp_path, monkeypatch, act):
    """Weights over the link as whole copies (activations on the GPU) or in pieces (small pieces
    here: many per weight; activations in host memory), host and disk weights, one and two GPU
    batches; on the CPU the two are one path."""
    from flexgen_repro import schedule
    from flexgen_repro.devices import copy_engine
    model, config, weights, prompts, expected = setup
    monkeypatch.setattr(copy_engine, "COPY_CHUNK_BYTES", 4096)
    for overlap, k in ((False, 1), (True, 2)):
        pol = policy((0, 60, 100, 0) + act, overlap, k)
        assert schedule.whole_copies(pol) == (act[0] == 100)
        np.testing.assert_array_equal(generate(config, weights, pol, prompts, tmp_path), expected)


def test_one_prompt_and_many_blocks(setup, tmp_path):
    model, config, weights, prompts, expected = setup
    pol = policy((0, 100, 0, 100, 100, 0), True, 2, gpu_batch_size=1)
    np.testing.assert_array_equal(generate(config, weights, pol, prompts[:1], tmp_path), expected[:1])
    np.testing.assert_array_equal(generate(config, weights, pol, prompts, tmp_path), expected)


def test_list_inputs_and_bigger_batch_than_prompts(setup, tmp_path):
    model, config, weights, prompts, expected = setup
    pol = policy((100, 0, 100, 0, 100, 0), False, 1, gpu_batch_size=16)
    out = generate(config, weights, pol, prompts.tolist(), tmp_path)
    np.testing.assert_array_equal(out, expected)


def test_stop_token_matches_transformers_eos(setup, tmp_path):
    """HF stops a row at eos and pads the rest; `stop` must do the same. The stop id is the token
    most often generated by the reference, so several rows stop at different steps."""
    model, config, weights, prompts, expected = setup
    gen = expected[:, prompts.shape[1]:]
    stop = int(np.bincount(gen[:, 1:].ravel()).argmax())
    want = hf_greedy(model, prompts, GEN, eos=stop)
    assert (want[:, prompts.shape[1]:] == config.pad_token_id).any(), "test needs a row that stops"
    for overlap in (False, True):
        pol = policy((50, 50, 50, 50, 100, 0), overlap, 2)
        out = generate(config, weights, pol, prompts, tmp_path, stop=stop)
        np.testing.assert_array_equal(out, want)


def test_sampling_is_seeded_and_tends_to_greedy(setup, tmp_path):
    model, config, weights, prompts, expected = setup
    pol = policy((50, 50, 100, 0, 100, 0), True, 2)
    a = generate(config, weights, pol, prompts, tmp_path, do_sample=True, temperature=1.0, seed=7)
    b = generate(config, weights, pol, prompts, tmp_path, do_sample=True, temperature=1.0, seed=7)
    c = generate(config, weights, pol, prompts, tmp_path, do_sample=True, temperature=1.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(), "different seeds gave identical samples over 7x6 tokens"
    # at a tiny temperature the softmax is one-hot on the argmax: sampling equals greedy
    cold = generate(config, weights, pol, prompts, tmp_path, do_sample=True, temperature=1e-4, seed=3)
    np.testing.assert_array_equal(cold, expected)


def test_logits_match_transformers(setup, tmp_path):
    """Float32 logits of every real position, through a split placement, against HF.
    Tolerance 1e-4 absolute: float32 rounding of a 2-layer, 32-wide model is ~1e-6."""
    model, config, weights, prompts, expected = setup
    pol = policy((30, 30, 30, 30, 30, 30), True, 2)
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        ours = OptLM(config, env, weights, pol).logits(prompts)
    ref = hf_logits(model, prompts)
    real = prompts != config.pad_token_id
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_within_tolerance(tiny_opt, tmp_path, dtype):
    """At 16 bits the runtime's logits stay close to HF float32 logits. Bound: 2% of the logit
    range for float16 (10-bit mantissa, ~5e-4 per rounding over ~20 roundings in 2 layers) and 8%
    for bfloat16 (7-bit mantissa, 8x coarser); measured max errors are well under these."""
    model, ckpt, weights = tiny_opt
    config = get_opt_config(ckpt, dtype=dtype)
    prompts = random_prompts(4, 9, config.vocab_size, seed=2, pad_rows=2)
    pol = policy((50, 50, 0, 100, 100, 0), True, 2)
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        ours = OptLM(config, env, weights, pol).logits(prompts)
    ref = hf_logits(model, prompts)
    real = prompts != config.pad_token_id
    span = ref[real].max() - ref[real].min()
    bound = 0.02 if dtype == "float16" else 0.08
    assert np.abs(ours[real] - ref[real]).max() <= bound * span


def test_sparse_attention_is_placement_independent(setup, tmp_path):
    """Top-k sparse decode attention gives the same tokens with the cache on any tier."""
    model, config, weights, prompts, expected = setup
    outs = []
    for pct, cpu in [((100, 0, 100, 0, 100, 0), False), ((0, 100, 0, 100, 0, 100), True),
                     ((0, 0, 0, 0, 100, 0), False), ((50, 0, 30, 30, 100, 0), True)]:
        pol = policy(pct, True, 2, attn_sparsity=0.5, cpu_cache_compute=cpu)
        outs.append(generate(config, weights, pol, prompts, tmp_path))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    pol = policy((100, 0, 100, 0, 100, 0), True, 2, attn_sparsity=1.0)
    np.testing.assert_array_equal(generate(config, weights, pol, prompts, tmp_path), expected)


def test_env_close_removes_its_files_and_joins_threads(setup, tmp_path):
    model, config, weights, prompts, expected = setup
    import threading

    def copy_threads() -> set:
        return {t for t in threading.enumerate() if t.name.startswith("copy-")}
    others = copy_threads()  # environments of other tests in this process are not this one's
    off = tmp_path / "offload"
    env = ExecutionEnv.create(str(off))
    lm = OptLM(config, env, "_DUMMY_", policy((0, 0, 0, 0, 0, 0), True, 2))
    lm.generate(prompts[:4], max_new_tokens=2)
    assert any(off.iterdir()) and copy_threads() - others
    env.close()
    assert not any(off.iterdir())
    assert not copy_threads() - others


def test_failing_copy_raises_in_caller(setup, tmp_path):
    """A disk weight file that disappears makes the background load fail: generate raises the
    error instead of hanging. Buffered reads open the file at every load (a mapped file would
    outlive its name)."""
    model, config, weights, prompts, expected = setup
    with ExecutionEnv.create(str(tmp_path / "off"), options=RuntimeOptions(disk_io="buffered")) as env:
        lm = OptLM(config, env, "_DUMMY_", policy((0, 0, 100, 0, 100, 0), True, 2))
        for f in (tmp_path / "off").iterdir():
            os.remove(f)
        with pytest.raises(FileNotFoundError):
            lm.generate(prompts, max_new_tokens=2)


def test_bad_inputs_are_refused_with_the_fix(setup, tmp_path):
    model, config, weights, prompts, expected = setup
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        lm = OptLM(config, env, weights, policy((100, 0, 100, 0, 100, 0)))
        with pytest.raises(ValueError, match="left-pad"):
            lm.generate([[5, 6, 7], [5, 6]])
        with pytest.raises(ValueError, match="at least one prompt"):
            lm.generate([])
        with pytest.raises(ValueError, match="exceeds"):
            lm.generate(prompts, max_new_tokens=config.max_seq_len)
        with pytest.raises(ValueError, match="token ids must be in"):
            lm.generate([[config.vocab_size]])
        with pytest.raises(ValueError, match="temperature"):
            lm.generate(prompts, do_sample=True, temperature=0)
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        with pytest.raises(FileNotFoundError, match="prepare-weights"):
            OptLM(config, env, str(tmp_path / "nowhere"), policy((100, 0, 100, 0, 100, 0)))


def test_chunked_mlp_prefill_matches_transformers(setup, tmp_path, monkeypatch):
    """Long prompts run the MLP in token chunks (bounded GPU memory); outputs stay identical."""
    import flexgen_repro.model.layers as layers
    model, config, weights, prompts, expected = setup
    monkeypatch.setattr(layers, "MLP_CHUNK_TOKENS", 5)
    pol = policy((50, 50, 100, 0, 100, 0), True, 2)
    np.testing.assert_array_equal(generate(config, weights, pol, prompts, tmp_path), expected)


def test_max_steps_warmup_then_full_run_reuses_the_cache(setup, tmp_path):
    """A warm-up of one step with the cache sized for the full run, then the full run on the same
    (kept) cache: identical to transformers; the warm-up's later columns stay pad."""
    model, config, weights, prompts, expected = setup
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        lm = OptLM(config, env, weights, policy((30, 30, 30, 30, 30, 30), True, 2))
        warm = lm.generate(prompts, max_new_tokens=GEN, max_steps=1)
        np.testing.assert_array_equal(warm[:, :prompts.shape[1] + 1], expected[:, :prompts.shape[1] + 1])
        assert (warm[:, prompts.shape[1] + 1:] == config.pad_token_id).all()
        np.testing.assert_array_equal(lm.generate(prompts, max_new_tokens=GEN), expected)


def test_fp16_disk_weights_are_read_from_the_weight_folder(tiny_opt, tmp_path):
    """At float16 the disk tier reads the weight folder's np.save files in place (header skipped,
    parallel preads): same tokens as with every weight on the GPU, and no copies are written."""
    model, ckpt, weights = tiny_opt
    config = get_opt_config(ckpt, dtype="float16")
    prompts = random_prompts(4, 9, config.vocab_size, seed=5, pad_rows=2)
    outs = []
    for pct in [(100, 0, 100, 0, 100, 0), (0, 0, 100, 0, 100, 0)]:
        off = tmp_path / f"off{pct[0]}"
        with ExecutionEnv.create(str(off)) as env:
            lm = OptLM(config, env, weights, policy(pct, True, 2))
            assert lm.weight_placement["disk"] == (100.0 if pct[0] == 0 else 0.0)
            outs.append(lm.generate(prompts, max_new_tokens=GEN))
            assert not list(off.glob("*.bin"))  # disk weights were not copied into the offload dir
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("overlap,k", [(False, 1), (True, 3)])
def test_a_gpu_held_cache_decodes_in_place_and_matches_transformers(setup, tmp_path, monkeypatch,
                                                                    overlap, k):
    """A cache wholly on the GPU (uncompressed, dense attention) is attended as its home buffer,
    the new token written in place (the path CUDA graphs replay), with no separate store; a cache
    partly elsewhere keeps the general path."""
    from flexgen_repro.model import layers
    model, config, weights, prompts, expected = setup
    calls = {"resident": 0, "general": 0}
    resident, general = layers.SelfAttention._resident_decode, layers.SelfAttention._decode

    def count(name, fn):
        def wrapped(self, *args, **kwargs):
            calls[name] += 1
            return fn(self, *args, **kwargs)
        return wrapped
    monkeypatch.setattr(layers.SelfAttention, "_resident_decode", count("resident", resident))
    monkeypatch.setattr(layers.SelfAttention, "_decode", count("general", general))
    out = generate(config, weights, policy((0, 100, 100, 0, 100, 0), overlap, k), prompts, tmp_path)
    np.testing.assert_array_equal(out, expected)
    assert calls["resident"] > 0 and calls["general"] == 0
    calls.update(resident=0, general=0)
    out = generate(config, weights, policy((0, 100, 50, 50, 100, 0), overlap, k), prompts,
                   tmp_path / "split")
    np.testing.assert_array_equal(out, expected)
    assert calls["general"] > 0 and calls["resident"] == 0
