"""The resident decode path (what CUDA-graph decode runs: SDPA over the whole home buffer, q/k/v
as one GEMM of unequal widths) for the Llama family, on the CPU: grouped-query heads, rotary
positions with scaling, q/k/v biases and a sliding window, against the general decode path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_repro.config import LlamaConfig, RopeScaling
from flexgen_repro.devices.storage import Stored
from flexgen_repro.graph_decode import fuse_qkv
from flexgen_repro.model import layers
from flexgen_repro.model.base import CachePart, StepInfo
from flexgen_repro.policy import Tier

CFG = LlamaConfig(name="toy", num_hidden_layers=1, n_head=4, n_kv_head=2, hidden_size=32,
                  intermediate_size=64, max_seq_len=64, vocab_size=50, attention_bias=True,
                  rope_scaling=RopeScaling("llama3", 4.0, 8), sliding_window=5)
B, MAX_LEN, N_PREV = 3, 20, 11
# the general path rounds scores to float32 for the softmax; float64 elsewhere: outputs of order 1
# agree within a few float32 ulps
GENERAL_TOL = 1e-6


def _case(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    attn = layers.SelfAttention(config, 0)
    w = {s.key: (1 + 0.1 * r(*s.shape)) if s.kind == "ln_weight" else 0.2 * r(*s.shape)
         for s in attn.specs()}
    d = config.head_dim
    k_home = torch.zeros(B, config.n_kv_head, MAX_LEN, d, dtype=torch.float64)
    v_home = torch.zeros_like(k_home)
    k_home[:, :, :N_PREV] = r(B, config.n_kv_head, N_PREV, d)
    v_home[:, :, :N_PREV] = r(B, config.n_kv_head, N_PREV, d)
    mask = torch.zeros(B, MAX_LEN, dtype=torch.bool)
    mask[:, :N_PREV + 1] = True
    mask[1, :4] = False
    positions = (mask[:, :N_PREV + 1].cumsum(1) - 1)[:, -1:]
    return attn, w, r(B, 1, config.hidden_size), k_home, v_home, mask, positions


def _general(attn, w, x, k_home, v_home, mask, positions):
    step = StepInfo(1, N_PREV, mask[:, :N_PREV + 1], positions)
    part = CachePart(0, B, torch.device("cpu"), k_home[:, :, :N_PREV].clone(), v_home[:, :, :N_PREV].clone())
    out, (k, v) = attn.forward(x, w, step, [part])
    return out, k, v


def _resident(attn, w, x, k_home, v_home, mask, positions):
    step = StepInfo(1, N_PREV, mask, positions)
    part = CachePart(0, B, torch.device("cpu"), k_home, v_home, True, torch.tensor([N_PREV]))
    return attn.forward(x, w, step, [part])[0]


@pytest.mark.parametrize("window", [5, None])
def test_resident_decode_matches_the_general_path(window):
    config = dataclasses.replace(CFG, sliding_window=window)
    attn, w, x, k_home, v_home, mask, positions = _case(config)
    want, k_new, v_new = _general(attn, w, x, k_home, v_home, mask, positions)
    got = _resident(attn, w, x, k_home, v_home, mask, positions)
    torch.testing.assert_close(got, want, rtol=GENERAL_TOL, atol=GENERAL_TOL)
    torch.testing.assert_close(k_home[:, :, N_PREV:N_PREV + 1], k_new, rtol=0, atol=0)
    torch.testing.assert_close(v_home[:, :, N_PREV:N_PREV + 1], v_new, rtol=0, atol=0)


def test_window_changes_the_result_here():
    attn, w, x, k_home, v_home, mask, positions = _case(CFG, 1)
    windowed = _resident(attn, w, x, k_home.clone(), v_home.clone(), mask, positions)
    full = layers.SelfAttention(dataclasses.replace(CFG, sliding_window=None), 0)
    assert (windowed - _resident(full, w, x, k_home, v_home, mask, positions)).abs().max() > 1e-3


def test_fused_qkv_of_unequal_widths():
    """q is 4 heads wide, k and v 2: the fused buffer is 8 head widths, each part a view."""
    attn, w, x, k_home, v_home, mask, positions = _case(CFG, 2)
    home = {key: Stored(Tier.GPU, t.clone()) for key, t in w.items()}
    fused = fuse_qkv(home)
    d = CFG.head_dim
    assert fused["w_qkv"].shape == (8 * d, CFG.hidden_size) and fused["b_qkv"].shape == (8 * d,)
    assert home["w_k"].data.data_ptr() == fused["w_qkv"][4 * d].data_ptr()
    assert home["w_v"].data.data_ptr() == fused["w_qkv"][6 * d].data_ptr()
    assert fuse_qkv(home)["w_qkv"] is fused["w_qkv"]
    want = _resident(attn, w, x, k_home.clone(), v_home.clone(), mask, positions)
    got = _resident(attn, {**{k: s.data for k, s in home.items()}, **fused}, x, k_home, v_home, mask,
                    positions)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fused_qkv_without_biases():
    config = dataclasses.replace(CFG, attention_bias=False)
    attn, w, *_ = _case(config, 3)
    fused = fuse_qkv({key: Stored(Tier.GPU, t.clone()) for key, t in w.items()})
    assert set(fused) == {"w_qkv"}
