"""Pinned host buffers (devices/tiers.MemDevice): a large long-lived buffer is an ordinary
allocation registered with CUDA at its exact size and unregistered on release or close; one whose
registration is refused stays pageable, with one warning, instead of taking torch's pinned
allocator, which rounds a block up to a power of two. A stand-in registry replaces CUDA here."""
from __future__ import annotations

import warnings

import pytest
import torch

from flexgen_repro.devices import tiers
from flexgen_repro.devices.tiers import MemDevice
from flexgen_repro.policy import Tier

BIG = (MemDevice.REGISTER_MIN_BYTES // 2, )        # float16: exactly the registration threshold


class Registry:
    def __init__(self, monkeypatch, refuse: bool = False):
        self.registered, self.unregistered, self.refuse = [], [], refuse
        monkeypatch.setattr(tiers, "host_register", self.register)
        monkeypatch.setattr(tiers, "host_unregister", self.unregistered.append)
        self.pinned_allocs = []
        empty = torch.empty

        def spy_empty(*args, pin_memory=False, **kw):   # torch's pinned allocator, observed
            if pin_memory:
                self.pinned_allocs.append(args)
                return empty(*args, **kw)
            return empty(*args, **kw)
        monkeypatch.setattr(tiers.torch, "empty", spy_empty)

    def register(self, ptr, nbytes, flags=0):
        self.registered.append((ptr, nbytes))
        return not self.refuse


def host() -> MemDevice:
    return MemDevice(Tier.CPU, torch.device("cpu"), can_pin=True)


def test_a_large_buffer_is_registered_at_its_exact_size_and_unregistered(monkeypatch):
    cuda = Registry(monkeypatch)
    dev = host()
    a = dev.alloc(BIG, torch.float16, pin=True)
    b = dev.alloc((3, 5, 7 << 18), torch.float16, pin=True)       # not a power of two
    assert cuda.registered == [(a.data_ptr(), 8 << 20), (b.data_ptr(), 3 * 5 * (7 << 18) * 2)]
    assert cuda.pinned_allocs == []
    dev.release(a)
    assert cuda.unregistered == [a.data_ptr()]
    dev.close()
    assert cuda.unregistered == [a.data_ptr(), b.data_ptr()]


def test_a_refused_large_buffer_stays_pageable_with_one_warning(monkeypatch):
    cuda = Registry(monkeypatch, refuse=True)
    dev = host()
    with pytest.warns(RuntimeWarning, match="refused to pin a 8 MiB host buffer") as caught:
        a = dev.alloc(BIG, torch.float16, pin=True)
        b = dev.alloc(BIG, torch.float16, pin=True)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert a.shape == b.shape == BIG and len(cuda.registered) == 2
    assert cuda.pinned_allocs == []                 # no power-of-two rounding
    dev.close()
    assert cuda.unregistered == []                  # nothing was registered


def test_small_or_short_lived_buffers_come_from_the_pinned_allocator(monkeypatch):
    cuda = Registry(monkeypatch)
    dev = host()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dev.alloc((1024,), torch.float16, pin=True)
        dev.alloc(BIG, torch.float16, pin=True, long_lived=False)
    assert cuda.registered == [] and len(cuda.pinned_allocs) == 2
    assert dev.alloc(BIG, torch.float16, pin=False).shape == BIG and len(cuda.pinned_allocs) == 2
