"""Shared fixtures: tiny random OPTs built with transformers, saved as a checkpoint and as a
weight folder (fp16 files, as prepare-weights writes them)."""
from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from flexgen_repro.weights.layout import hf_key_to_file_name, weight_dir


def make_hf_opt(hidden=32, layers=2, heads=4, ffn=64, vocab=128, seed=0, max_pos=64):
    """A random OPTForCausalLM in float32 whose weights are exactly representable in fp16."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    ffn_dim=ffn, vocab_size=vocab, max_position_embeddings=max_pos,
                    word_embed_proj_dim=hidden, do_layer_norm_before=True, pad_token_id=1,
                    bos_token_id=2, eos_token_id=None, dropout=0.0, attention_dropout=0.0)
    # no eos: HF's generate then neither stops at nor suppresses any token, so plain greedy
    # decoding is compared (min_new_tokens would mask token 2 and make the reference non-greedy)
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            # larger than OPT's init so that random logits are well separated (no argmax ties),
            # then rounded through fp16 so the fp16 weight folder holds exactly these values
            p.copy_((p + torch.randn_like(p) * 0.05).half().float())
    return model


def percent_policy(pct, gpu_batch_size: int = 2, num_gpu_batches: int = 2, **kw):
    """A Policy from the six placement percentages (w, cache, act on GPU and CPU) and switches."""
    from flexgen_repro import Policy
    return Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches,
                  w_gpu_percent=pct[0], w_cpu_percent=pct[1], cache_gpu_percent=pct[2],
                  cache_cpu_percent=pct[3], act_gpu_percent=pct[4], act_cpu_percent=pct[5], **kw)


def save_weight_folder(model, root: str, name: str) -> str:
    folder = weight_dir(root, name)
    os.makedirs(folder, exist_ok=True)
    for key, t in model.state_dict().items():
        fname = hf_key_to_file_name(key)
        if fname is None:
            continue
        with open(os.path.join(folder, fname), "wb") as f:
            np.save(f, t.detach().cpu().numpy().astype(np.float16))
    return folder


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    """(hf_model, hf_checkpoint_dir, weight_root): the checkpoint folder's name is the model name."""
    root = tmp_path_factory.mktemp("tiny_opt")
    model = make_hf_opt()
    ckpt = os.path.join(root, "hf", "tiny-opt")
    model.save_pretrained(ckpt)
    weights = os.path.join(root, "weights")
    save_weight_folder(model, weights, "tiny-opt")
    return model, ckpt, weights


def hf_greedy(model, prompts: np.ndarray, gen_len: int, pad: int = 1, eos=None) -> np.ndarray:
    ids = torch.from_numpy(prompts)
    mask = (ids != pad).long()
    kwargs = dict(max_new_tokens=gen_len, do_sample=False, pad_token_id=pad)
    if eos is not None:  # rows stop at `eos` and are padded after it
        kwargs.update(eos_token_id=eos)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **kwargs)
    out = out.numpy()
    if out.shape[1] < prompts.shape[1] + gen_len:  # every row stopped early
        fill = np.full((out.shape[0], prompts.shape[1] + gen_len - out.shape[1]), pad)
        out = np.concatenate([out, fill], axis=1)
    return out


def hf_logits(model, prompts: np.ndarray, pad: int = 1) -> np.ndarray:
    """transformers' float logits of every position of left-padded prompts."""
    ids = torch.from_numpy(prompts)
    with torch.no_grad():
        return model(ids, attention_mask=(ids != pad).long()).logits.numpy()


def random_prompts(n: int, length: int, vocab: int, seed: int = 0, pad_rows: int = 0) -> np.ndarray:
    """Random prompts; the first `pad_rows` rows are left-padded by different amounts."""
    rng = np.random.default_rng(seed)
    p = rng.integers(3, vocab, size=(n, length))
    for r in range(min(pad_rows, n)):
        p[r, : (r % (length - 1)) + 1] = 1
    return p


# two xdist workers on two cores: one intra-op thread each avoids oversubscription
torch.set_num_threads(1)


class EagerReplay:
    """For graph-decode classes (GraphedDecode, StreamedGraphs): 'graphs' that re-run the captured
    step on each replay, and picked ids that reach the host by a plain copy: what the CUDA graphs
    replay, without CUDA. `replays` counts the replays on the class."""

    replays = 0

    def _record(self, *step):
        self._body(*step)                   # the warm-up run, as at capture

        def replay():
            type(self).replays += 1
            self._body(*step)
        return SimpleNamespace(replay=replay)

    def _inputs(self, i: int, k: int) -> dict:
        # on the GPU the ids are copied from output_ids; on the CPU `.to(device)` would alias it,
        # and the static inputs (advanced in place) would write into the output
        return {name: t.clone() for name, t in super()._inputs(i, k).items()}

    def _to_host(self, i: int, k: int, ids):
        return ids.clone(), SimpleNamespace(synchronize=lambda: None)


def _eager(graphs: type) -> type:
    return type(f"Eager{graphs.__name__}", (EagerReplay, graphs), {"replays": 0})


def _eager_graph_decode(monkeypatch, graphs: type, gate: str) -> type:
    """Make the block driver decode through an EagerReplay form of `graphs` (GraphedDecode or
    StreamedGraphs) wherever no logits are wanted, whatever the placement; return that class,
    whose `replays` count from 0."""
    from flexgen_repro import graph_stream
    from flexgen_repro.schedule import driver
    cls = _eager(graphs)
    monkeypatch.setattr(graph_stream, gate, lambda policy, env, want_logits: not want_logits)
    monkeypatch.setattr(driver, graphs.__name__, cls)
    return cls


@pytest.fixture
def eager_graphs(monkeypatch) -> type:
    """All-GPU graph decode, eagerly (graph_decode.GraphedDecode)."""
    from flexgen_repro.graph_decode import GraphedDecode
    return _eager_graph_decode(monkeypatch, GraphedDecode, "graphable")


@pytest.fixture
def eager_streamed(monkeypatch) -> type:
    """Streamed-weight graph decode, eagerly (graph_stream.StreamedGraphs)."""
    from flexgen_repro.graph_stream import StreamedGraphs
    return _eager_graph_decode(monkeypatch, StreamedGraphs, "streamable")


def check_graphed_stop(setup, offload: str, policy, eager: type, gen: int) -> None:
    """With `stop` at row 0's third token, graph decode (the `eager` fixture's class) gives the
    very output of the driver without graphs, padding after the stop. `setup`: (config, weight
    folder, prompts, the reference greedy output)."""
    from flexgen_repro import ExecutionEnv, OptLM
    from flexgen_repro.options import RuntimeOptions
    config, weights, prompts, expected = setup
    stop = int(expected[0, prompts.shape[1] + 2])
    with ExecutionEnv.create(offload) as env:
        graphed = OptLM(config, env, weights, policy).generate(prompts, gen, stop=stop)
        plain = OptLM(config, env, weights, policy, RuntimeOptions(cuda_graphs=False)) \
            .generate(prompts, gen, stop=stop)
    assert eager.replays > 0
    np.testing.assert_array_equal(graphed, plain)
    assert (graphed[0, prompts.shape[1] + 3:] == config.pad_token_id).all()
