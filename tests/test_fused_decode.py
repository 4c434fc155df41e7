"""The fused resident decode path (CUDA-graph decode: SDPA over the whole home buffer, heads as
views, q/k/v as one GEMM) against the general decode path and float64 maths."""
from __future__ import annotations

import pytest
import torch

from flexgen_repro.config import OptConfig
from flexgen_repro.devices.storage import Stored
from flexgen_repro.graph_decode import fuse_qkv
from flexgen_repro.model import layers
from flexgen_repro.model.base import CachePart, StepInfo
from flexgen_repro.policy import Tier

CFG = OptConfig(name="toy", num_hidden_layers=1, n_head=4, hidden_size=32, input_dim=32,
                ffn_embed_dim=64, max_seq_len=64, vocab_size=50)
B, MAX_LEN, N_PREV = 3, 20, 11
# float64 throughout: the resident path and the float64 reference are the same maths in a
# different order, so they agree to a few ulps of float64 on values of order 1
TOL = 1e-12
# the general path rounds scores to float32 for the softmax (as the runtime does at every dtype):
# probabilities within a few float32 ulps (2^-23 ~ 1.2e-7) of each other, outputs of order 1
GENERAL_TOL = 1e-6


def _weights(gen):
    h = CFG.hidden_size
    w = {f"w_{p}": torch.randn(h, h, generator=gen, dtype=torch.float64) * 0.2 for p in ("q", "k", "v", "out")}
    w.update({f"b_{p}": torch.randn(h, generator=gen, dtype=torch.float64) * 0.1 for p in ("q", "k", "v", "out")})
    w["w_ln_attn"] = 1 + 0.1 * torch.randn(h, generator=gen, dtype=torch.float64)
    w["b_ln_attn"] = 0.1 * torch.randn(h, generator=gen, dtype=torch.float64)
    return w


def _case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    attn = layers.SelfAttention(CFG, 0)
    w = _weights(gen)
    x = torch.randn(B, 1, CFG.hidden_size, generator=gen, dtype=torch.float64)
    shape = (B, CFG.n_head, MAX_LEN, CFG.hidden_size // CFG.n_head)
    k_home = torch.zeros(shape, dtype=torch.float64)
    v_home = torch.zeros(shape, dtype=torch.float64)
    k_home[:, :, :N_PREV] = torch.randn(B, CFG.n_head, N_PREV, shape[-1], generator=gen, dtype=torch.float64)
    v_home[:, :, :N_PREV] = torch.randn(B, CFG.n_head, N_PREV, shape[-1], generator=gen, dtype=torch.float64)
    mask = torch.zeros(B, MAX_LEN, dtype=torch.bool)
    mask[:, :N_PREV + 1] = True
    mask[1, :4] = False          # left padding in one row
    mask[2, 0] = False
    return attn, w, x, k_home, v_home, mask


def _general(attn, w, x, k_home, v_home, mask):
    """The general (non-resident) decode: earlier positions loaded, the new token beside them."""
    step = StepInfo(1, N_PREV, mask[:, :N_PREV + 1], torch.zeros(B, 1, dtype=torch.long))
    part = CachePart(0, B, torch.device("cpu"), k_home[:, :, :N_PREV].clone(),
                     v_home[:, :, :N_PREV].clone())
    out, (k, v) = attn.forward(x, w, step, [part])
    return out, k, v


def test_decode_hands_the_store_the_host_copies_where_every_row_was_attended_on_the_cpu():
    """General decode over parts attended on the CPU returns the new keys and values as copied
    there for the attention (the cache store writes them without a copy from the GPU); where a
    part is attended elsewhere (here a buffer with room, attended in place as a GPU segment is),
    it returns none, and the store takes the projections themselves."""
    attn, w, x, k_home, v_home, mask = _case()
    gen = torch.Generator().manual_seed(1)
    d = CFG.hidden_size // CFG.n_head
    q, k_new, v_new = (torch.randn(B, CFG.n_head, 1, d, generator=gen, dtype=torch.float64)
                       for _ in range(3))
    step = StepInfo(1, N_PREV, mask[:, :N_PREV + 1], torch.zeros(B, 1, dtype=torch.long))
    cpu = torch.device("cpu")
    prev = [CachePart(a, b, cpu, k_home[a:b, :, :N_PREV].clone(), v_home[a:b, :, :N_PREV].clone())
            for a, b in ((0, 1), (1, B))]
    out, host_kv = attn._decode(q, k_new, v_new, step, prev)
    assert torch.equal(host_kv[0], k_new) and torch.equal(host_kv[1], v_new)
    assert host_kv[0].device.type == "cpu"
    room = CachePart(1, B, cpu, k_home[1:].clone(), v_home[1:].clone(), valid=N_PREV, in_place=True)
    split, none = attn._decode(q, k_new, v_new, step, [prev[0], room])
    assert none is None
    torch.testing.assert_close(split, out, rtol=GENERAL_TOL, atol=GENERAL_TOL)


def _reference(w, x, k_home, v_home, mask):
    """Written out in float64: layer norm, projections, softmax over real positions, output."""
    h, nh = CFG.hidden_size, CFG.n_head
    d = h // nh
    hn = torch.nn.functional.layer_norm(x, (h,), w["w_ln_attn"], w["b_ln_attn"], CFG.layer_norm_eps)
    q, k, v = ((hn @ w[f"w_{n}"].T + w[f"b_{n}"]).view(B, nh, d) for n in "qkv")
    keys = torch.cat([k_home[:, :, :N_PREV], k[:, :, None]], dim=2)       # (b, heads, n+1, d)
    vals = torch.cat([v_home[:, :, :N_PREV], v[:, :, None]], dim=2)
    scores = torch.einsum("bhd,bhld->bhl", q, keys) / d ** 0.5
    scores = scores.masked_fill(~mask[:, None, :N_PREV + 1], float("-inf"))
    attn = torch.einsum("bhl,bhld->bhd", scores.softmax(-1), vals).reshape(B, 1, h)
    return attn @ w["w_out"].T + w["b_out"] + x


def _resident(attn, w, x, k_home, v_home, mask):
    step = StepInfo(1, N_PREV, mask, torch.zeros(B, 1, dtype=torch.long))
    part = CachePart(0, B, torch.device("cpu"), k_home, v_home, True, torch.tensor([N_PREV]))
    out, _ = attn.forward(x, w, step, [part])
    return out


def test_resident_decode_matches_the_general_path_and_writes_the_new_token():
    attn, w, x, k_home, v_home, mask = _case()
    want, k_new, v_new = _general(attn, w, x, k_home, v_home, mask)
    before = k_home.clone()
    got = _resident(attn, w, x, k_home, v_home, mask)
    torch.testing.assert_close(got, _reference(w, x, k_home, v_home, mask), rtol=TOL, atol=TOL)
    torch.testing.assert_close(got, want, rtol=GENERAL_TOL, atol=GENERAL_TOL)
    torch.testing.assert_close(k_home[:, :, N_PREV:N_PREV + 1], k_new, rtol=0, atol=0)
    torch.testing.assert_close(v_home[:, :, N_PREV:N_PREV + 1], v_new, rtol=0, atol=0)
    # nothing else in the home buffer changed
    keep = torch.ones(MAX_LEN, dtype=torch.bool)
    keep[N_PREV] = False
    assert torch.equal(k_home[:, :, keep], before[:, :, keep])


def test_resident_decode_ignores_whatever_the_unwritten_tail_holds():
    attn, w, x, k_home, v_home, mask = _case(1)
    clean = _resident(attn, w, x, k_home.clone(), v_home.clone(), mask)
    k_home[:, :, N_PREV + 1:] = 1e3   # masked positions: large but finite garbage
    v_home[:, :, N_PREV + 1:] = -1e3
    torch.testing.assert_close(_resident(attn, w, x, k_home, v_home, mask), clean, rtol=TOL, atol=TOL)


def test_fused_qkv_rehomes_as_views_is_idempotent_and_gives_the_same_output():
    attn, w, x, k_home, v_home, mask = _case(2)
    home = {key: Stored(Tier.GPU, t.clone()) for key, t in w.items()}
    fused = fuse_qkv(home)
    h = CFG.hidden_size
    assert fused["w_qkv"].shape == (3 * h, h) and fused["b_qkv"].shape == (3 * h,)
    for i, n in enumerate("qkv"):
        assert torch.equal(home[f"w_{n}"].data, w[f"w_{n}"])
        assert home[f"w_{n}"].data.data_ptr() == fused["w_qkv"][i * h].data_ptr()  # a view
    again = fuse_qkv(home)
    assert again["w_qkv"] is fused["w_qkv"] and again["b_qkv"] is fused["b_qkv"]
    want = _resident(attn, w, x, k_home.clone(), v_home.clone(), mask)
    got = _resident(attn, {**{k: s.data for k, s in home.items()}, **fused}, x, k_home, v_home, mask)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_fused_qkv_leaves_layers_it_cannot_fuse_alone():
    attn, w, *_ = _case(3)
    home = {key: Stored(Tier.GPU, t.clone()) for key, t in w.items()}
    home["w_k"] = Stored(Tier.CPU, w["w_k"].clone())          # one projection off the GPU
    assert fuse_qkv(home) == {}
    assert home["w_q"].data._base is None
    assert fuse_qkv({"w_fc1": Stored(Tier.GPU, torch.zeros(2, 2))}) == {}   # an MLP layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused ReLU epilogue)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_relu_epilogue_matches_linear_then_relu(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 1, 64, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(128, 64, device="cuda", dtype=dtype, generator=gen) * 0.1
    b = torch.randn(128, device="cuda", dtype=dtype, generator=gen) * 0.1
    want = torch.relu(x.double() @ w.double().T + b.double())
    got = layers._linear_relu(x, w, b)
    assert got.shape == want.shape and got.dtype == dtype
    # one rounding of a 64-term fp32-accumulated dot product to 16 bits: bounded by 16-bit ulp
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=2 * eps, atol=2 * eps)


class _FakeGraphs:
    """Stands in for GraphedDecode (CUDA only): token i of every row picks `picks[i]`."""

    def __init__(self, run, picks):
        self.run, self.picks, self.queued, self.collected = run, picks, [], []
        self.in_flight = {}

    def queue_token(self, i, batches):
        for k in batches:
            self.queued.append((i, k))
            self.in_flight.setdefault(i, []).append(k)

    def collect(self, i):
        for k in self.in_flight.pop(i):
            rows = slice(k * self.run.B, (k + 1) * self.run.B)
            self.run.output_ids[rows, self.run.prompt_len + i] = self.picks[i]
        self.collected.append(i)


def _pipelined(gen_len, stop, picks, max_steps=None, K=2, B=2, prompt_len=3):
    import numpy as np
    from types import SimpleNamespace
    from flexgen_repro.schedule import BlockSteps, GraphedPipeline
    run = SimpleNamespace(cache_stores={}, gen_len=gen_len, max_steps=max_steps or gen_len, K=K,
                          B=B, stop=stop, want_logits=False, prompt_len=prompt_len, pad=1,
                          stopped=np.zeros(B * K, dtype=bool), step_times=[],
                          output_ids=np.full((B * K, prompt_len + gen_len), 1, np.int64),
                          live_batches=list(range(K)), stop_check=None)
    for name in ("finish_token", "all_stopped", "wait_cache_stores", "_unfinished_batches"):
        setattr(run, name, getattr(BlockSteps, name).__get__(run))
    graphs = _FakeGraphs(run, picks)
    GraphedPipeline(graphs).decode(run, 1)
    return run, graphs


def test_pipelined_decode_queues_each_token_before_collecting_the_last():
    run, graphs = _pipelined(5, None, {i: 10 + i for i in range(5)})
    assert graphs.queued == [(i, k) for i in range(1, 5) for k in range(2)]
    assert graphs.collected == [1, 2, 3, 4]
    assert (run.output_ids[:, 4:] == [11, 12, 13, 14]).all()
    assert len(run.step_times) == 4 and not graphs.in_flight


def test_pipelined_decode_stops_one_token_late_and_leaves_that_token_padding():
    # every row emits the stop token (7) at token 2: token 3 is already queued, never collected
    run, graphs = _pipelined(6, 7, {1: 20, 2: 7, 3: 30, 4: 40, 5: 50})
    assert graphs.collected == [1, 2]
    assert [i for i, _ in graphs.queued] == [1, 1, 2, 2, 3, 3]
    assert (run.output_ids[:, 3 + 1] == 20).all() and (run.output_ids[:, 3 + 2] == 7).all()
    assert (run.output_ids[:, 3 + 3:] == 1).all()   # what the unpipelined loop leaves there
    assert not graphs.in_flight


def test_pipelined_decode_respects_max_steps():
    run, graphs = _pipelined(6, None, {i: i for i in range(6)}, max_steps=3)
    assert graphs.collected == [1, 2] and max(i for i, _ in graphs.queued) == 2
    assert (run.output_ids[:, 3 + 3:] == 1).all()
