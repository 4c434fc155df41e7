"""Streamed-weight graph decode (graph_stream.py): weights copied from host memory into fixed
slots, one graph per (layer, GPU batch). On the CPU the driver's path runs with "graphs" that
re-run the captured step eagerly, so the slots' order of loads and reuse decides the output:
greedy output must equal transformers' at float32 (a layer reading another layer's weights, or a
slot refilled before its layer ran, changes the tokens of a random model with well-separated
logits). On a GPU the real graphs must give the same tokens as decode without graphs."""
from __future__ import annotations

import gc
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import (check_graphed_stop, hf_greedy, hf_logits, make_hf_opt, random_prompts,
                      save_weight_folder)
from flexgen_repro import ExecutionEnv, OptLM, Policy, flex_opt, get_opt_config
from flexgen_repro.devices.storage import Stored
from flexgen_repro.graph_stream import WeightSlots, streamable
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.policy import Tier

GEN = 6
LAYERS = 4   # two slots per kind: the attention and MLP slots are each reused within a token


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model = make_hf_opt(layers=LAYERS)
    weights = os.path.join(root, "weights")
    save_weight_folder(model, weights, "tiny-opt")
    ckpt = os.path.join(root, "hf", "tiny-opt")
    model.save_pretrained(ckpt)
    config = get_opt_config(ckpt, dtype=np.float32)
    prompts = random_prompts(6, 7, config.vocab_size, seed=3, pad_rows=3)
    return config, weights, prompts, hf_greedy(model, prompts, GEN)


def streamed(k: int, **kw) -> Policy:
    return Policy(gpu_batch_size=2, num_gpu_batches=k, w_gpu_percent=0, w_cpu_percent=100,
                  cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100,
                  act_cpu_percent=0, **kw)


@pytest.mark.parametrize("k,sep", [(2, True), (3, False)])
def test_streamed_graphs_match_transformers(setup, tmp_path, eager_streamed, k, sep):
    config, weights, prompts, expected = setup
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, streamed(k, sep_layer=sep))
        out = lm.generate(prompts, max_new_tokens=GEN)
        again = lm.generate(prompts, max_new_tokens=GEN)   # the captures reused across calls
        graphs = next(iter(lm.block_state["graphs"].values()))
        slots = lm.block_state["slots"]
        assert flex_opt.decode_graphs(lm) == "streamed-weights"   # as flex_opt's record says
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(again, expected)
    n_layers = len(lm.layers)
    # 6 prompts in GPU batches of 2: blocks of k batches, those holding prompts decode GEN - 1
    # tokens through one replay per layer each
    batches = sum(min(k, 3 - b) for b in range(0, 3, k))
    assert eager_streamed.replays == 2 * batches * n_layers * (GEN - 1)
    assert len(graphs.graphs) == n_layers * min(k, 3)
    # every weight is read from one of at most two slots per kind of layer
    per_kind = Counter(kind for kind, _ in slots.slot_of)
    assert len(slots.buffers) == sum(min(2, n) for n in per_kind.values()) < n_layers
    views = slots.weights(1)
    assert all(v.data_ptr() != lm.weight_home[1][key].data.data_ptr() for key, v in views.items())


def test_a_gpu_batch_first_seen_in_a_later_block_captures_every_graph_again(
        setup, tmp_path, eager_streamed):
    """Two prompts in two GPU batches of two leave the second batch all filler: its graphs are not
    captured. Four prompts then decode both; the graphs are captured again, all in (layer, batch)
    order, rather than the second batch's after the first's (graph_stream.StreamedGraphs)."""
    config, weights, prompts, expected = setup
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, streamed(2))
        first = lm.generate(prompts[:2], max_new_tokens=GEN)
        graphs = next(iter(lm.block_state["graphs"].values()))
        captured = dict(graphs.graphs)
        second = lm.generate(prompts[:4], max_new_tokens=GEN)
    n_layers = len(lm.layers)
    np.testing.assert_array_equal(first, expected[:2])
    np.testing.assert_array_equal(second, expected[:4])
    assert sorted(captured) == [(j, 0) for j in range(n_layers)]
    assert sorted(graphs.graphs) == [(j, k) for j in range(n_layers) for k in range(2)]
    assert not any(graphs.graphs[key] is graph for key, graph in captured.items())


def test_a_logits_call_after_a_generation_of_its_cache_length_takes_no_graphs(
        setup, tmp_path, eager_streamed):
    """Graphs are kept per cache length; a logits call of that length (one token after the
    prompt) is not graphed, and leaves them as they were. Its logits are transformers' at every
    real position, within 1e-4 (float32 rounding of a 4-layer, 32-wide model is ~1e-6)."""
    config, weights, prompts, _ = setup
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, streamed(2))
        lm.generate(prompts, max_new_tokens=1)
        graphs = dict(lm.block_state["graphs"])
        started = []
        for g in graphs.values():
            g.start_block = lambda block, g=g: started.append(g)
        logits = lm.logits(prompts)
        assert lm.block_state["graphs"] == graphs and not started
    want = hf_logits(make_hf_opt(layers=LAYERS), prompts)   # the model setup saved (seeded)
    real = prompts != config.pad_token_id
    np.testing.assert_allclose(logits[real], want[real], atol=1e-4, rtol=0)


def test_a_gpu_short_of_the_slots_decodes_without_graphs_and_says_so(
        setup, tmp_path, eager_streamed, monkeypatch):
    """The slots are allocated before the block starts; where that runs out of memory the run
    warns once, naming the fix, and decodes the driver's way (same tokens), block after block."""
    config, weights, prompts, expected = setup

    def short(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(WeightSlots, "allocate", short)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        lm = OptLM(config, env, weights, streamed(2))
        with pytest.warns(UserWarning, match="decoding without CUDA graphs.*--gpu-batch-size") \
                as warned:
            out = lm.generate(prompts, max_new_tokens=GEN)       # two blocks, one warning
        assert len(warned) == 1
        assert lm.block_state["slots"] is False and not lm.block_state["graphs"]
    np.testing.assert_array_equal(out, expected)
    assert eager_streamed.replays == 0


def test_streamed_graphs_with_4bit_weights_match_the_driver_without_graphs(
        setup, tmp_path, eager_streamed):
    """4-bit weights cross as their packed components, each into its own view of the slot; the
    dequantized matmuls then see the very values the ungraphed driver loads."""
    config, weights, prompts, _ = setup
    policy = streamed(2, compress_weight=True)
    with ExecutionEnv.create(str(tmp_path / "offload")) as env:
        graphed = OptLM(config, env, weights, policy).generate(prompts, GEN)
        plain = OptLM(config, env, weights, policy, RuntimeOptions(cuda_graphs=False)) \
            .generate(prompts, GEN)
    assert eager_streamed.replays > 0
    np.testing.assert_array_equal(graphed, plain)


def test_streamed_graphs_stop_like_the_driver_without_graphs(setup, tmp_path, eager_streamed):
    check_graphed_stop(setup, str(tmp_path / "offload"), streamed(3), eager_streamed, GEN)


def test_the_text_job_through_streamed_graphs_equals_transformers(tmp_path, eager_streamed):
    """The text job (prompts of 1 to about 40 tokens, several blocks, the last one partial, cache
    lengths by block) decoded through streamed-weight graphs: each completion is transformers'
    greedy one."""
    from flexgen_repro.llm import LLM
    from text_checkpoint import corpus_lines, hf_greedy_text, make_text_checkpoint
    ckpt = make_text_checkpoint(str(tmp_path / "tiny-text"))
    lines = corpus_lines()
    prompts = [lines[i % len(lines)][: 1 + (i * 53) % 160] for i in range(11)]
    with LLM(ckpt, path=str(tmp_path / "w"), policy=streamed(2), dtype="float32",
             offload_dir=str(tmp_path / "off")) as llm:
        out = llm.generate(prompts, max_new_tokens=GEN)
        assert llm.stats.blocks > 1
    assert [c.token_ids for c in out] == hf_greedy_text(ckpt, prompts, GEN)
    assert eager_streamed.replays > 0


def _home(kinds: str, sizes: list[int]) -> list[dict]:
    """Layers of host-resident weights: layer j holds one tensor named `kinds[j]` of `sizes[j]`
    values, every value j."""
    return [{kind: Stored(Tier.CPU, torch.full((n,), float(j)))}
            for j, (kind, n) in enumerate(zip(kinds, sizes))]


def test_weight_slots_load_in_layer_order_into_free_slots():
    """Six layers of three kinds (the third held by one layer only), two tokens: each layer
    computes from its own weights, loads run ahead only into slots whose last layer has been
    released, and the next token's first layers load behind the last. A slot is as large as the
    largest of its layers (here the first kind's layers hold 4 and 7 values, both in slot 0)."""
    slots = WeightSlots.create(_home("ababc", [4, 8, 3, 8, 2]) + _home("a", [7]),
                               torch.device("cpu"))
    assert [n for _, n in slots.slot_of] == [0, 0, 1, 1, 0, 0]
    ahead = []
    for _ in range(2):
        for j in range(6):
            slots.acquire(j)
            w = slots.weights(j)
            assert torch.equal(w[slots.slot_of[j][0][0]], next(iter(slots.home[j].values())).data)
            slots.release(j)
            ahead.append(sorted(slots.loaded))
    # after releasing j, the loads queued are the next layers up to the first whose slot is
    # held: releasing layer 0 frees slot a0 for layer 5, layer 5 frees it for the next token's 0
    assert ahead[:6] == [[1, 2, 3, 4, 5], [2, 3, 4, 5], [3, 4, 5], [4, 5], [5], [0, 1, 2, 3, 4]]
    assert ahead[6:] == ahead[:6]
    assert len(slots.buffers) == 5
    assert slots.buffers[(("a",), 0)].numel() == 7 * 4 + (512 - 28)   # one aligned float32 tensor


def test_weight_slots_restart_forgets_loads_queued_ahead():
    slots = WeightSlots.create(_home("www", [4, 4, 4]), torch.device("cpu"))
    slots.acquire(0)
    slots.release(0)
    assert sorted(slots.loaded) == [1, 2]       # layer 2 loads into layer 0's slot, freed
    slots.restart()
    assert not slots.loaded and not slots.held
    slots.acquire(0)                            # a new block starts at layer 0 again
    assert torch.equal(slots.weights(0)["w"], torch.zeros(4))


def test_only_weights_in_memory_stream():
    """Disk-resident weights are read, not copied from a pinned home: no slots for them."""
    cpu = torch.device("cpu")
    assert WeightSlots.create([{"w": Stored(Tier.DISK, data=object())}], cpu) is None
    assert WeightSlots.create([{"w": Stored(Tier.GPU, torch.zeros(2))}], cpu) is None
    cuda = SimpleNamespace(has_cuda=True)
    base = dict(gpu_batch_size=4, num_gpu_batches=4, w_gpu_percent=0, w_cpu_percent=100,
                cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)
    assert streamable(Policy(**base), cuda, False)
    assert not streamable(Policy(**base), cuda, True)                         # logits wanted
    assert not streamable(Policy(**base), SimpleNamespace(has_cuda=False), False)
    for change in (dict(w_gpu_percent=100, w_cpu_percent=0),                 # nothing streams
                   dict(w_gpu_percent=50, w_cpu_percent=50),                 # half stays
                   dict(w_cpu_percent=50),                                   # half on disk
                   dict(pin_weight=False), dict(overlap=False),
                   dict(cache_gpu_percent=50, cache_cpu_percent=50),
                   dict(act_gpu_percent=0, act_cpu_percent=100),
                   dict(compress_cache=True), dict(cpu_cache_compute=True),
                   dict(attn_sparsity=0.5)):
        assert not streamable(Policy(**{**base, **change}), cuda, False), change


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("four_bit", [False, True])
def test_streamed_graphs_on_a_gpu_give_the_tokens_of_decode_without_graphs(tmp_path, four_bit):
    """OPT-1.3B's dummy weights in pinned host memory, 4x4 (16-bit, and 4-bit read by the fused
    matmul from the slots' packed components): the same kernels replayed from graphs over the
    slots give the very tokens of the same kernels launched one by one (dummy weights leave
    near-ties between the top logits, so a slot refilled before its layer ran, or read before its
    copy ended, flips tokens)."""
    outs = {}
    for graphs in ("true", "false"):
        args = flex_opt.build_parser().parse_args(
            ["--model", "opt-1.3b", "--path", "_DUMMY_", "--offload-dir", str(tmp_path),
             "--percent", "0", "100", "100", "0", "100", "0", "--gpu-batch-size", "4",
             "--num-gpu-batches", "4", "--prompt-len", "64", "--gen-len", "12",
             "--cuda-graphs", graphs] + (["--compress-weight"] if four_bit else []))
        try:
            with flex_opt.prepared(args) as ready:
                outs[graphs] = [np.asarray(ready.lm.generate(ready.prompts, max_new_tokens=12))
                                for _ in range(2)]
                kind = flex_opt.decode_graphs(ready.lm)
        finally:
            gc.unfreeze()          # prepared() freezes the collector for a measured run
        assert kind == ("streamed-weights" if graphs == "true" else "none")
    for run in outs["true"] + outs["false"][1:]:
        np.testing.assert_array_equal(run, outs["false"][0])
