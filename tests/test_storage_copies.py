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
