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


def test_link_gate_waits_for_every_registered_small_copy_once():
    from flexgen_repro.devices.storage import LinkGate

    class Ev:
        def __init__(self):
            self.waited = 0

        def synchronize(self):
            self.waited += 1

        def query(self):          # polled (the default): done once asked
            self.waited += 1
            return True
    gate = LinkGate()
    gate.enabled = True
    events = [Ev(), Ev()]
    for e in events:
        gate.register(e)
    gate.wait_clear()
    gate.wait_clear()            # nothing pending any more: no second wait
    assert [e.waited for e in events] == [1, 1]
    gate.enabled = False         # FLEXGEN_LINK_GATE=0: nothing is held back
    gate.register(Ev())
    assert gate._pending == []


def test_wait_done_polls_until_the_handle_reports_done(monkeypatch):
    from flexgen_repro.devices import storage

    class Handle:
        def __init__(self, polls):
            self.polls, self.synced = polls, False

        def query(self):
            self.polls -= 1
            return self.polls < 0

        def synchronize(self):
            self.synced = True
    monkeypatch.setattr(storage, "COPY_POLL_S", 1e-6)
    h = Handle(3)
    storage.wait_done(h)
    assert h.polls == -1 and not h.synced      # queried 4 times, never blocked
    monkeypatch.setattr(storage, "COPY_POLL_S", 0.0)
    h = Handle(3)
    storage.wait_done(h)
    assert h.synced and h.polls == 3           # FLEXGEN_COPY_POLL_US=0: one blocking wait


def _disk_file(tmp_path, numel, dtype, seed=0):
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)
    f = storage.new_disk_file(str(tmp_path), (numel,), dtype)
    f.write(slice(None), values)
    return f, values


def _record_opens(monkeypatch, refuse_direct=False):
    import os
    opened, real_open = [], os.open

    def fake_open(path, flags, *args):
        direct = bool(flags & getattr(os, "O_DIRECT", 0))
        opened.append(direct)
        if direct and refuse_direct:
            raise OSError(22, "Invalid argument")   # what tmpfs answers
        return real_open(path, flags, *args)
    monkeypatch.setattr(storage.os, "open", fake_open)
    return opened


@pytest.mark.skipif(not hasattr(__import__("os"), "O_DIRECT"), reason="O_DIRECT is Linux-only")
# sizes in bytes (fp16/bf16: 2 per element): a block and a half, whole blocks over several
# read chunks, less than one block (nothing for O_DIRECT to read)
@pytest.mark.parametrize("numel", [3 * 1024, 16 * 4096, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_direct_disk_reads_return_the_written_bytes(tmp_path, monkeypatch, numel, dtype):
    monkeypatch.setattr(storage, "DISK_DIRECT", True)
    monkeypatch.setattr(storage, "_READ_CHUNK", 8192)      # several chunks, several threads
    f, values = _disk_file(tmp_path, numel, dtype)
    opened = _record_opens(monkeypatch)
    got = f.read()
    assert got.dtype == dtype and torch.equal(got.view(torch.int16), values.view(torch.int16))
    assert got.data_ptr() % storage._DIRECT_ALIGN == 0
    # O_DIRECT for the whole blocks (when there is one), a buffered open for a partial block
    nbytes = numel * 2
    whole, tail = nbytes >= storage._DIRECT_ALIGN, nbytes % storage._DIRECT_ALIGN > 0
    assert opened == [True] * whole + [False] * tail


def test_direct_disk_reads_fall_back_to_buffered_where_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "DISK_DIRECT", True)
    f, values = _disk_file(tmp_path, 5000, torch.float16, seed=1)
    opened = _record_opens(monkeypatch, refuse_direct=hasattr(__import__("os"), "O_DIRECT"))
    got = f.read()
    assert torch.equal(got, values)
    assert opened[-1] is False and len(opened) <= 2


def test_buffered_disk_reads_by_default_and_for_npy_files(tmp_path, monkeypatch):
    import numpy as np
    monkeypatch.setattr(storage, "DISK_DIRECT", False)                  # FLEXGEN_DISK_DIRECT unset
    f, values = _disk_file(tmp_path, 5000, torch.float16, seed=2)
    opened = _record_opens(monkeypatch)
    assert torch.equal(f.read(), values) and opened == [False]
    monkeypatch.setattr(storage, "DISK_DIRECT", True)
    path = tmp_path / "w.npy"                                            # data after a 128-byte header
    np.save(path, values.numpy())
    npy = storage.DiskFile(str(path), (5000,), torch.float16, npy=True)
    opened.clear()
    assert torch.equal(npy.read(), values) and opened == [False]         # not block-aligned: buffered


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", [((1000,), torch.float32), ((7, 33), torch.float16),
                                         ((4097,), torch.uint8)])
def test_copy_staged_matches_a_plain_copy(device, shape, dtype, monkeypatch):
    """Pageable host memory through the staging blocks: many pieces (more than there are blocks,
    so each block is refilled), a short last one, any element size."""
    monkeypatch.setattr(storage, "STAGE_CHUNK_BYTES", 64)
    src = (torch.arange(torch.Size(shape).numel()) % 251).to(dtype).view(shape)
    dst = torch.empty(shape, dtype=dtype, device=device)
    assert storage.copy_staged_(dst, src) is dst
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)
    assert len(storage._STAGE_RING.blocks) == storage.COPY_IN_FLIGHT + 1  # reused, not grown


def test_staging_blocks_grow_with_the_piece_size(monkeypatch):
    monkeypatch.setattr(storage, "STAGE_CHUNK_BYTES", 16)
    storage.copy_staged_(torch.empty(40, dtype=torch.uint8), torch.ones(40, dtype=torch.uint8))
    monkeypatch.setattr(storage, "STAGE_CHUNK_BYTES", 256)
    src = torch.arange(300, dtype=torch.int64) % 256
    dst = torch.empty(300, dtype=torch.int64)
    storage.copy_staged_(dst, src)
    assert torch.equal(dst, src)
    assert all(b.numel() >= 256 for b in storage._STAGE_RING.blocks)


def test_only_large_pageable_host_tensors_bound_for_the_gpu_are_staged(monkeypatch):
    gpu, big = torch.device("cuda"), torch.ones(storage.STAGE_MIN_BYTES // 4, dtype=torch.float32)
    monkeypatch.setattr(storage, "STAGE_PAGEABLE", True)
    assert storage._wants_staging(big, gpu)
    assert not storage._wants_staging(big[:-1], gpu)            # under STAGE_MIN_BYTES
    assert not storage._wants_staging(big, torch.device("cpu"))
    monkeypatch.setattr(storage, "STAGE_PAGEABLE", False)      # FLEXGEN_STAGE_PAGEABLE=0
    assert not storage._wants_staging(big, gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_stages_pageable_tensors_and_not_pinned_ones(monkeypatch):
    """A large pageable tensor goes through the staging blocks (in 64 KiB pieces here: 128 of
    them through 3 blocks, so a block refilled before its copy had crossed would corrupt the
    result); a pinned one is copied directly."""
    monkeypatch.setattr(storage, "COPY_CHUNK_BYTES", 64 << 10)
    calls = []
    real = storage.copy_staged_
    monkeypatch.setattr(storage, "copy_staged_", lambda d, s: calls.append(s) or real(d, s))
    src = torch.randn(2 << 20)                                # 8 MiB, pageable
    out = storage.to_device(src, torch.device("cuda"))
    torch.cuda.synchronize()
    assert len(calls) == 1 and torch.equal(out.cpu(), src)
    pinned = src.pin_memory()
    out = storage.to_device(pinned, torch.device("cuda"))
    torch.cuda.synchronize()
    assert len(calls) == 1 and torch.equal(out.cpu(), src)


@pytest.mark.parametrize("use_cuda", [False, pytest.param(True, marks=CUDA)])
def test_pipelined_channel_jobs_resolve_in_order_with_their_copies_done(use_cuda, monkeypatch):
    """A pipelined job's future holds its result only once its copies are done; the thread queues
    the next job meanwhile; a failing job reaches its caller and later jobs still run."""
    from flexgen_repro.devices import env as env_mod
    monkeypatch.setattr(env_mod, "PIPELINED_COPIES", True)
    ch = env_mod.Channel("weight", use_cuda, inline=False)
    assert (ch._waiter is not None) == use_cuda  # no stream, no waiter: plain jobs
    dev = torch.device("cuda" if use_cuda else "cpu")
    srcs = [torch.full((1 << 22,), float(i)).pin_memory() if use_cuda else torch.full((1 << 22,), float(i))
            for i in range(6)]

    def load(src):
        dst = torch.empty(src.shape, dtype=src.dtype, device=dev)
        return dst.copy_(src, non_blocking=True)

    def fail():
        raise RuntimeError("copy failed")

    futs = [ch.submit(load, s, pipelined=True) for s in srcs[:3]]
    bad = ch.submit(fail, pipelined=True)
    futs += [ch.submit(load, s, pipelined=True) for s in srcs[3:]]
    for i, fut in enumerate(futs):
        out = fut.result()
        assert out.device.type == dev.type
        # no synchronize here: the future resolving means the copy is done
        assert torch.equal(out.cpu(), srcs[i])
    with pytest.raises(RuntimeError, match="copy failed"):
        bad.result()
    ch.close()
    assert ch._pool is None and ch._waiter is None
