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
