"""devices.storage copy helpers: `to_host` (several tensors, one wait) and `copy_chunked_` (pieces)
give the same bytes as a plain copy, on the CPU and, where CUDA is, from and to the GPU."""
from __future__ import annotations

import pytest
import torch

from flexgen_repro.devices import storage

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
def test_to_host_returns_equal_host_tensors(device):
    src = [torch.randn(3, 4, 1, 8, device=device).half()[1:], torch.randn(5, device=device).half(),
           torch.randn(2, 3, device=device).half().t()]  # a row slice, a vector, a transposed view
    got = storage.to_host(*src)
    assert [g.device.type for g in got] == ["cpu"] * 3
    for g, s in zip(got, src):
        assert g.shape == s.shape and torch.equal(g, s.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_copy_chunked_matches_a_plain_copy(device, monkeypatch):
    monkeypatch.setattr(storage, "COPY_CHUNK_BYTES", 64)  # many pieces, and a short last one
    src = torch.arange(1000, dtype=torch.float32)
    dst = torch.empty(1000, dtype=torch.float32, device=device)
    storage.copy_chunked_(dst, src)
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)
