"""The copy engine (devices/copy_engine.py) and the copy channels (devices/channels.py): copies in
pieces and through the staging blocks give the same bytes as a plain copy, on the CPU and, where
CUDA is, to the GPU; the link gate and the pipelined channel keep their order."""
from __future__ import annotations

import pytest
import torch

from flexgen_repro.devices import copy_engine

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
def test_copy_chunked_matches_a_plain_copy(device, monkeypatch):
    monkeypatch.setattr(copy_engine, "COPY_CHUNK_BYTES", 64)  # many pieces, and a short last one
    src = torch.arange(1000, dtype=torch.float32)
    dst = torch.empty(1000, dtype=torch.float32, device=device)
    copy_engine.copy_chunked_(dst, src)
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)


def test_wait_done_sleeps_until_the_handle_is_done_and_counts_each_sleep(monkeypatch):
    class Handle:                 # done at the third query
        def __init__(self):
            self.queries = 0

        def query(self):
            self.queries += 1
            return self.queries >= 3
    naps = []
    monkeypatch.setattr(copy_engine.time, "sleep", naps.append)
    before, handle = copy_engine.poll_count(), Handle()
    copy_engine.wait_done(handle)
    assert handle.queries == 3 and naps == [copy_engine.COPY_POLL_S] * 2
    assert copy_engine.poll_count() - before == 2


def test_peak_memory_records_the_polls_of_its_block(monkeypatch):
    from flexgen_repro.metrics import PeakMemory
    class Handle:
        def __init__(self, answers):
            self.answers = iter(answers)

        def query(self):
            return next(self.answers)
    monkeypatch.setattr(copy_engine.time, "sleep", lambda s: None)
    copy_engine.wait_done(Handle([False, True]))                # before the block: not counted
    with PeakMemory(interval_s=0.001) as peak:
        copy_engine.wait_done(Handle([False, False, False, True]))
    assert peak.copy_polls == 3
    assert peak.allocator_events is None if not torch.cuda.is_available() else \
        peak.allocator_events is not None


def test_link_gate_waits_for_every_registered_small_copy_once():
    from flexgen_repro.devices.copy_engine import LinkGate

    class Ev:
        def __init__(self):
            self.waited = 0

        def synchronize(self):
            self.waited += 1

        def query(self):          # polled (the default): done once asked
            self.waited += 1
            return True
    gate = LinkGate()
    events = [Ev(), Ev()]
    for e in events:
        gate.register(e)
    gate.wait_clear()
    gate.wait_clear()            # nothing pending any more: no second wait
    assert [e.waited for e in events] == [1, 1]


def test_wait_done_polls_until_the_handle_reports_done(monkeypatch):
    from flexgen_repro.devices import copy_engine

    class Handle:
        def __init__(self, polls):
            self.polls, self.synced = polls, False

        def query(self):
            self.polls -= 1
            return self.polls < 0

        def synchronize(self):
            self.synced = True
    monkeypatch.setattr(copy_engine, "COPY_POLL_S", 1e-6)
    h = Handle(3)
    copy_engine.wait_done(h)
    assert h.polls == -1 and not h.synced      # queried 4 times, never blocked
    monkeypatch.setattr(copy_engine, "COPY_POLL_S", 0.0)
    h = Handle(3)
    copy_engine.wait_done(h)
    assert h.synced and h.polls == 3           # a poll interval of 0: one blocking wait


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", [((1000,), torch.float32), ((7, 33), torch.float16),
                                         ((4097,), torch.uint8)])
def test_copy_staged_matches_a_plain_copy(device, shape, dtype, monkeypatch):
    """Pageable host memory through the staging blocks: many pieces (more than there are blocks,
    so each block is refilled), a short last one, any element size."""
    monkeypatch.setattr(copy_engine, "STAGE_CHUNK_BYTES", 64)
    src = (torch.arange(torch.Size(shape).numel()) % 251).to(dtype).view(shape)
    dst = torch.empty(shape, dtype=dtype, device=device)
    ring = copy_engine.StageRing()
    assert copy_engine.copy_staged_(dst, src, ring) is dst
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)
    assert len(ring.blocks) == copy_engine.COPY_IN_FLIGHT + 1  # reused, not grown


def test_staging_blocks_grow_with_the_piece_size(monkeypatch):
    ring = copy_engine.StageRing()
    monkeypatch.setattr(copy_engine, "STAGE_CHUNK_BYTES", 16)
    copy_engine.copy_staged_(torch.empty(40, dtype=torch.uint8), torch.ones(40, dtype=torch.uint8), ring)
    monkeypatch.setattr(copy_engine, "STAGE_CHUNK_BYTES", 256)
    src = torch.arange(300, dtype=torch.int64) % 256
    dst = torch.empty(300, dtype=torch.int64)
    copy_engine.copy_staged_(dst, src, ring)
    assert torch.equal(dst, src)
    assert all(b.numel() >= 256 for b in ring.blocks)


def test_only_large_pageable_host_tensors_bound_for_the_gpu_are_staged():
    gpu, big = torch.device("cuda"), torch.ones(copy_engine.STAGE_MIN_BYTES // 4, dtype=torch.float32)
    assert copy_engine.wants_staging(big, gpu)
    assert not copy_engine.wants_staging(big[:-1], gpu)            # under STAGE_MIN_BYTES
    assert not copy_engine.wants_staging(big, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_stages_pageable_tensors_and_not_pinned_ones(monkeypatch):
    """A large pageable tensor goes through the staging blocks (in 64 KiB pieces here: 128 of
    them through 3 blocks, so a block refilled before its copy had crossed would corrupt the
    result); a pinned one is copied directly."""
    monkeypatch.setattr(copy_engine, "COPY_CHUNK_BYTES", 64 << 10)
    calls = []
    engine = copy_engine.CopyEngine()
    real = engine.copy_staged_
    monkeypatch.setattr(engine, "copy_staged_", lambda d, s: calls.append(s) or real(d, s))
    src = torch.randn(2 << 20)                                # 8 MiB, pageable
    out = engine.to_device(src, torch.device("cuda"))
    torch.cuda.synchronize()
    assert len(calls) == 1 and torch.equal(out.cpu(), src)
    pinned = src.pin_memory()
    out = engine.to_device(pinned, torch.device("cuda"))
    torch.cuda.synchronize()
    assert len(calls) == 1 and torch.equal(out.cpu(), src)


@pytest.mark.parametrize("use_cuda", [False, pytest.param(True, marks=CUDA)])
def test_pipelined_channel_jobs_resolve_in_order_ready_on_the_callers_stream(use_cuda):
    """A pipelined job's result, taken on the caller's stream, reads its copies' data (the stream
    waits for them); a failing job reaches its caller and later jobs still run."""
    from flexgen_repro.devices.channels import Channel
    ch = Channel("weight", use_cuda, inline=False)
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
        # no synchronize here: .cpu() runs on the current stream, which result() ordered after
        # the job's copies
        assert torch.equal(out.cpu(), srcs[i])
    with pytest.raises(RuntimeError, match="copy failed"):
        bad.result()
    ch.close()
    assert ch._pool is None and not ch._in_flight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pipelined_job_resolves_before_its_copies_end_and_bounds_those_in_flight():
    """The future resolves once the copies are queued (the host does not wait for the link); the
    copy thread holds at most PIPELINE_DEPTH jobs in flight, waiting for the oldest first."""
    from flexgen_repro.devices import channels
    ch = channels.Channel("weight", True, inline=False)
    src = torch.full((1 << 20,), 5.0).pin_memory()

    def slow_load():
        torch.cuda._sleep(int(1e9))          # about half a second on the copy stream
        return torch.empty(src.shape, device="cuda").copy_(src, non_blocking=True)
    futs = [ch.submit(slow_load, pipelined=True) for _ in range(channels.PIPELINE_DEPTH + 1)]
    first = futs[0].result()
    assert not futs[0].done_event.query()    # resolved while its copy still runs
    last = futs[-1].result()                 # queued only once the first job's copies ended
    assert futs[0].done_event.query()
    assert torch.equal(first.cpu(), src) and torch.equal(last.cpu(), src)
    ch.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_job_not_after_compute_copies_while_compute_still_runs():
    """A channel job waits for the work queued on the compute stream before it (a store reads
    compute's output) unless submitted with after_compute=False (a cache load, which reads only
    what stores wrote): its copy then finishes while a long kernel still runs."""
    from flexgen_repro.devices.channels import Channel
    ch = Channel("cache_load", True, inline=False)
    src = torch.full((1 << 20,), 3.0).pin_memory()

    def load():
        return torch.empty(src.shape, device="cuda").copy_(src, non_blocking=True)
    busy = torch.cuda.Event()
    torch.cuda._sleep(int(2e9))             # about a second of GPU time on the compute stream
    busy.record()
    early = ch.submit(load, after_compute=False).result()
    assert not busy.query()                 # the load finished before compute did
    late = ch.submit(load).result()
    assert busy.query()                     # the default waits for compute queued before it
    assert torch.equal(early.cpu(), src) and torch.equal(late.cpu(), src)
    ch.close()


@pytest.mark.parametrize("device", DEVICES)
def test_write_to_host_makes_every_write_as_a_plain_copy_would(device, monkeypatch):
    """Several small writes of mixed dtypes into strided host destinations (one position of a
    (rows, heads, length, d) home each, as a decode step's cache store): gathered into one copy
    and one wait per source device, the destinations get exactly the sources' values."""
    from flexgen_repro.devices import storage
    waits = []
    monkeypatch.setattr(storage, "wait_done", lambda handle: (waits.append(handle), handle.synchronize()))
    g = torch.Generator().manual_seed(0)
    # 30 bytes of codes first: the float32 values then start at byte 42 of the gathered copy,
    # not a multiple of their size
    homes = [torch.zeros(3, 2, 9, 5, dtype=torch.uint8), torch.zeros(3, 2, 9, 1, dtype=torch.float16),
             torch.zeros(3, 2, 9, 4, dtype=torch.float32)]
    sources = [torch.randint(0, 255, (3, 2, 1, 5), generator=g, dtype=torch.uint8),
               torch.randn(3, 2, 1, 1, generator=g).half(), torch.randn(3, 2, 1, 4, generator=g)]
    expected = [h.clone() for h in homes]
    for e, src in zip(expected, sources):
        e[:, :, 5:6] = src
    writes = [(h[:, :, 5:6], src.to(device)) for h, src in zip(homes, sources)]
    writes.append((homes[0][:, :, 7:8], sources[0].to(device)))     # a second write into one home
    expected[0][:, :, 7:8] = sources[0]
    storage.write_to_host(writes)
    for h, e in zip(homes, expected):
        assert torch.equal(h, e)
    assert len(waits) == (1 if device == "cuda" else 0)


def test_a_row_split_collects_its_host_writes_and_makes_the_others(tmp_path):
    """RowSplit.write with a list: each segment in host memory appends (its slice, its rows) and
    writes nothing; a disk segment writes its rows at once (its file is not host memory)."""
    from flexgen_repro.devices.disk_io import new_disk_file
    from flexgen_repro.devices.storage import PlainStore, RowSplit, Segment
    from flexgen_repro.policy import Tier
    host = torch.zeros(2, 6, 3)
    disk = new_disk_file(str(tmp_path), (1, 6, 3), torch.float32)
    split = RowSplit((3, 6, 3), [Segment(Tier.CPU, 0, 2, PlainStore(host)),
                                 Segment(Tier.DISK, 2, 3, PlainStore(disk))])
    value = torch.arange(9, dtype=torch.float32).view(3, 1, 3) + 1
    writes: list = []
    split.write(4, value, writes)
    assert len(writes) == 1 and not host.any()
    dst, src = writes[0]
    assert dst.data_ptr() == host[:, 4:5].data_ptr() and torch.equal(src, value[0:2])
    assert torch.equal(disk.read()[:, 4:5], value[2:3])


def test_packed_layout_aligns_each_component_and_carve_gives_disjoint_views():
    from flexgen_repro.devices.storage import BUFFER_ALIGN, carve, packed_layout
    parts = [("data", (3, 2, 7, 5), torch.uint8), ("scale", (3, 2, 7, 1), torch.float16),
             ("mn", (3, 2, 7, 1), torch.float16)]
    layout, nbytes = packed_layout(parts)
    offsets = [offset for *_, offset in layout]
    assert offsets == [0, 256, 384] and nbytes == 512      # 210 -> 256, 84 -> 128, 84 -> 128 bytes
    assert all(o % BUFFER_ALIGN == 0 for o in offsets)
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    views = carve(buffer, layout)
    for (name, shape, dtype), value in zip(parts, (7, 1.5, -2.0)):
        assert views[name].shape == shape and views[name].dtype == dtype
        views[name].fill_(value)
    # each write landed in its own range: the others kept their values
    assert (views["data"] == 7).all() and (views["scale"] == 1.5).all() and (views["mn"] == -2.0).all()


def test_a_packed_host_home_is_one_buffer_and_reads_back_what_was_written(tmp_path):
    """A 4-bit cache home in host memory: its components are views of one buffer (one copy per
    read of every position), and a read gives the written values."""
    from flexgen_repro import CompressionConfig, ExecutionEnv
    from flexgen_repro.compression import compress, decompress
    config = CompressionConfig(4, 8, 3, False)
    value = torch.randn(4, 2, 3, 16, generator=torch.Generator().manual_seed(1))
    with ExecutionEnv.create(str(tmp_path / "off")) as env:
        home = env.mixed.alloc((4, 2, 9, 16), torch.float32, (0, 100, 0), True, config, seq_dim=2,
                               zero=True)
        (seg,) = home.segments
        assert seg.store.buffer is not None
        ptrs = {t.untyped_storage().data_ptr() for t in (s.buf for s in seg.store.stores.values())}
        assert ptrs == {seg.store.buffer.untyped_storage().data_ptr()}
        home.write(5, value)
        read = decompress(seg.store.read_whole(env.gpu.dev))[:, :, 5:8]
    assert torch.equal(read, decompress(compress(value, config)))
