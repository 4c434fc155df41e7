"""devices/host_stage.to_host: a decode step's query, key and value reach the host as one copy of
their bytes gathered on the GPU, each back in its own shape, contiguous and bit-exact; host
tensors stay as they are."""
from __future__ import annotations

import pytest
import torch

from flexgen_repro.devices.host_stage import to_host


def _qkv(device: str):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 1, 8, 16, generator=gen).to(torch.float16).transpose(1, 2)  # strided view
    k, v = (torch.randn(4, 2, 1, 16, generator=gen).to(torch.float16) for _ in range(2))
    return tuple(t.to(device) for t in (q, k, v))


def test_host_tensors_stay_as_they_are():
    tensors = _qkv("cpu")
    assert all(a is b for a, b in zip(to_host(*tensors), tensors))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tensors_arrive_bit_exact_in_their_shapes():
    tensors = _qkv("cuda")
    moved = to_host(*tensors)
    for got, want in zip(moved, tensors):
        assert got.device.type == "cpu" and got.is_contiguous() and got.shape == want.shape
        assert torch.equal(got, want.cpu())
    # one buffer underneath: the pieces are consecutive in it
    assert moved[1].data_ptr() == moved[0].data_ptr() + moved[0].numel() * 2
