"""devices.storage.copy_chunked_ (copies in pieces) gives the same bytes as a plain copy, on the
CPU and, where CUDA is, to the GPU."""
from __future__ import annotations

import pytest
import torch

from flexgen_repro.devices import storage

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
def test_copy_chunked_matches_a_plain_copy(device, monkeypatch):
    monkeypatch.setattr(storage, "COPY_CHUNK_BYTES", 64)  # many pieces, and a short last one
    src = torch.arange(1000, dtype=torch.float32)
    dst = torch.empty(1000, dtype=torch.float32, device=device)
    storage.copy_chunked_(dst, src)
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)
