"""Grouped-query attention and the sliding window in the attention maths and the C CPU kernel,
against float64 references written out here: repeat each KV head for its query heads
(transformers' repeat_kv), attend per query head with explicit loops over the window."""
from __future__ import annotations

import math

import pytest
import torch

from flexgen_repro.kernels import cpu_attention
from flexgen_repro.model.attention_math import decode_attention, prefill_attention, repeat_kv
from flexgen_repro.model.base import CachePart
from flexgen_repro.model.layers import _attend_in_place

# float64 against float64: only summation order differs
F64_TOL = 1e-12
# decode scores and softmax run in float32 by design (attention_math.decode_attention), and the C
# kernel accumulates in float32: ~ positions * 2^-24 relative on outputs of order 1
F32_TOL = 1e-5


def _gqa_case(b=3, heads=6, kv_heads=2, length=12, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    mask = torch.ones(b, length + 1, dtype=torch.bool)
    mask[0, :4] = False                      # left padding
    return (r(b, heads, 1, d) * 0.3, r(b, kv_heads, length, d), r(b, kv_heads, length, d),
            r(b, kv_heads, 1, d), r(b, kv_heads, 1, d), mask)


def _reference_decode(q, k, v, kn, vn, mask, keep=None):
    """Per query head h over KV head h // group; `keep`: top-k earlier positions plus the new."""
    b, heads, _, d = q.shape
    ks, vs = repeat_kv(torch.cat([k, kn], 2), heads), repeat_kv(torch.cat([v, vn], 2), heads)
    out = torch.zeros(b, heads, d, dtype=torch.float64)
    for r in range(b):
        for h in range(heads):
            scores = ks[r, h] @ q[r, h, 0]
            scores[~mask[r]] = -math.inf
            if keep is not None:
                top = scores[:-1].topk(keep).indices
                drop = torch.ones(len(scores) - 1, dtype=torch.bool)
                drop[top] = False
                scores[:-1][drop] = -math.inf
            out[r, h] = torch.softmax(scores, 0) @ vs[r, h]
    return out.reshape(b, 1, heads * d)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
@pytest.mark.parametrize("sparsity", [1.0, 0.5])
def test_torch_decode_groups_query_heads(kv_heads, sparsity):
    q, k, v, kn, vn, mask = _gqa_case(kv_heads=kv_heads)
    keep = None if sparsity == 1.0 else math.ceil(sparsity * k.shape[2])
    want = _reference_decode(q, k, v, kn, vn, mask, keep)
    got = decode_attention(q, k, v, mask, sparsity, kn, vn)
    assert (got - want).abs().max() < F32_TOL


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_in_place_decode_writes_the_token_and_matches_the_reference(kv_heads):
    """A buffer with room (5 unwritten positions of garbage past the 12 written): the new token
    goes in at position 12 and the fused call over the whole buffer masks the rest."""
    q, k, v, kn, vn, mask = _gqa_case(kv_heads=kv_heads)
    want = _reference_decode(q, k, v, kn, vn, mask)
    g = torch.Generator().manual_seed(7)
    room = lambda t: torch.cat([t, torch.randn(*t.shape[:2], 5, t.shape[3], generator=g,  # noqa: E731
                                                   dtype=t.dtype)], 2)
    part = CachePart(0, q.shape[0], q.device, room(k), room(v), valid=k.shape[2], in_place=True)
    got = _attend_in_place(q, kn, vn, part, mask)
    assert (got - want).abs().max() < F64_TOL
    assert torch.equal(part.k[:, :, 12:13], kn) and torch.equal(part.v[:, :, 12:13], vn)
    assert torch.equal(part.k[:, :, :12], k)


@pytest.mark.skipif(cpu_attention.library() is None, reason="no C compiler here")
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_c_kernel_groups_query_heads(kv_heads):
    q, k, v, kn, vn, mask = _gqa_case(heads=6, kv_heads=kv_heads, dtype=torch.float32)
    want = _reference_decode(*(t.double() for t in (q, k, v, kn, vn)), mask)
    got = cpu_attention.decode_attention(q, k, v, mask, kn, vn, k.shape[2])
    assert (got.double() - want).abs().max() < F32_TOL


def test_c_kernel_refuses_heads_that_do_not_group():
    q, k, v, kn, vn, mask = _gqa_case(heads=6, kv_heads=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        cpu_attention.decode_attention(q, k, v, mask, kn, vn)


@pytest.mark.parametrize("window", [None, 1, 3, 5])
def test_prefill_window_and_groups(window):
    """Query column t sees columns c <= t with t - c < window, real tokens only (a padding query
    sees itself), each query head over its KV head."""
    g = torch.Generator().manual_seed(1)
    b, heads, kv_heads, s, d = 2, 4, 2, 7, 8
    q = torch.randn(b, heads, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, kv_heads, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, kv_heads, s, d, generator=g, dtype=torch.float64)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, :2] = False
    got = prefill_attention(q, k, v, mask, window).view(b, s, heads, d)
    for r in range(b):
        for h in range(heads):
            for t in range(s):
                seen = [c for c in range(t + 1) if (window is None or t - c < window)
                        and (mask[r, c] or c == t)]
                kk, vv = k[r, h // 2, seen], v[r, h // 2, seen]
                want = torch.softmax(kk @ q[r, h, t], 0) @ vv
                assert (got[r, t, h] - want).abs().max() < F64_TOL
