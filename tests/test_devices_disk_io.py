"""The disk tier in each I/O mode (devices/disk_io.py): bit-exact reads and writes of plain and
compressed tensors, aligned and unaligned sizes, rows split over tiers; O_DIRECT where the
filesystem takes it; "auto"'s choice; environments that share nothing; and the runtime's greedy
tokens, token-identical to transformers, with disk placements under every mode."""
from __future__ import annotations

import gc
import mmap
import os

import numpy as np
import pytest
import torch

from conftest import hf_greedy, random_prompts
from flexgen_repro import CompressionConfig, ExecutionEnv, OptLM, Policy, get_opt_config
from flexgen_repro.compression import decompress
from flexgen_repro.devices import disk_io, tiers
from flexgen_repro.devices.tiers import DiskDevice
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.policy import Tier

MODES = ["direct", "buffered", "mmap"]
HAS_DIRECT = hasattr(os, "O_DIRECT")
# element counts at 2 bytes each: a block and a half, whole blocks over several requests, less
# than one block
NUMELS = [3 * 1024, 16 * 4096, 100]
PAGE = mmap.PAGESIZE


def _values(shape, dtype, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bytes (bfloat16 and float16 compared as raw 16-bit patterns)."""
    a, b = a.contiguous(), b.contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_each_mode_writes_and_reads_whole_tensors_bit_exactly(tmp_path, monkeypatch, mode, numel, dtype):
    monkeypatch.setattr(disk_io, "READ_CHUNK", 8192)     # several requests, several threads
    disk = DiskDevice(str(tmp_path), mode)
    values = _values((numel,), dtype)
    stored = disk.put(values)
    assert _same_bits(stored.data.read(), values)
    assert _same_bits(stored.load(torch.device("cpu")), values)
    with open(stored.data.path, "rb") as f:                 # the file holds exactly those bytes
        assert f.read() == values.view(torch.int16).numpy().tobytes()
    disk.close()
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_writes_positions_and_reads_them_back(tmp_path, mode):
    """A cache-like (rows, heads, seq, d) file written one position at a time and in a block, read
    at a length and whole; only the written positions change."""
    disk = DiskDevice(str(tmp_path), mode)
    f = disk.alloc((3, 2, 10, 5), torch.float32)
    want = torch.zeros(3, 2, 10, 5)
    block = _values((3, 2, 4, 5), torch.float32, seed=1)
    f.write((slice(None), slice(None), slice(0, 4)), block)
    want[:, :, 0:4] = block
    for pos in (4, 5):
        tok = _values((3, 2, 1, 5), torch.float32, seed=pos)
        f.write((slice(None), slice(None), slice(pos, pos + 1)), tok)
        want[:, :, pos:pos + 1] = tok
    assert torch.equal(f.read((slice(None), slice(None), slice(0, 6))), want[:, :, :6])
    assert torch.equal(f.read(), want)
    disk.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compressed", [False, True])
def test_row_split_over_the_tiers_reads_back_what_was_written(tmp_path, mode, compressed):
    """Rows over GPU (host memory here), CPU and disk; plain values exactly, 4-bit values as the
    reference quantizer's round trip."""
    comp = CompressionConfig(num_bits=4, group_size=4, group_dim=3) if compressed else None
    with ExecutionEnv.create(str(tmp_path), options=RuntimeOptions(disk_io=mode)) as env:
        assert env.disk.io_mode == mode
        shape = (7, 2, 9, 8)
        t = env.mixed.alloc(shape, torch.float32, (30, 30, 40), compression=comp, seq_dim=2, zero=True)
        assert [s.tier for s in t.segments] == [Tier.GPU, Tier.CPU, Tier.DISK]
        values = _values((7, 2, 6, 8), torch.float32, seed=3)
        t.write(0, values[:, :, :5])
        t.write(5, values[:, :, 5:6])
        got = t.read_all(6, torch.device("cpu"))
        if compressed:
            from flexgen_repro.compression import compress
            # each write quantizes its own positions of each segment's rows (groups along d)
            def round_trip(x):
                return torch.cat([decompress(compress(x[s.start:s.stop], comp)) for s in t.segments])
            want = torch.cat([round_trip(values[:, :, :5]), round_trip(values[:, :, 5:6])], 2)
            assert torch.equal(got, want) and not torch.equal(got, values)
        else:
            assert torch.equal(got, values)
        disk_seg = t.segments[2]
        whole = disk_seg.store.read_whole(torch.device("cpu"))
        whole = whole if isinstance(whole, torch.Tensor) else decompress(whole)
        assert whole.shape[2] == 9 and torch.equal(whole[:, :, :6], got[disk_seg.start:])
        assert torch.equal(whole[:, :, 6:], torch.zeros_like(whole[:, :, 6:]))  # unwritten: zero
        assert disk_seg.store.whole_on_cpu == (mode == "mmap")
        if mode == "mmap" and not compressed:  # the mapping itself: a later write shows in it
            disk_seg.write(6, torch.ones(disk_seg.stop - disk_seg.start, 2, 1, 8))
            assert whole[:, :, 6].eq(1).all()
        env.mixed.free(t)


def test_mmap_reads_for_the_cpu_are_views_of_the_file_and_see_later_writes(tmp_path):
    disk = DiskDevice(str(tmp_path), "mmap")
    f = disk.alloc((4, 6), torch.float16)
    view = f.view()
    f.write((slice(None), slice(2, 3)), torch.ones(4, 1, dtype=torch.float16))
    assert torch.equal(view[:, 2], torch.ones(4, dtype=torch.float16))     # no copy was made
    copy = f.read()
    f.write((slice(None), slice(3, 4)), torch.ones(4, 1, dtype=torch.float16))
    assert torch.equal(copy[:, 3], torch.zeros(4, dtype=torch.float16))   # a read is its own buffer
    disk.close()


class FakeCudaRegistry:
    """Stands in for cudaHostRegister / cudaHostUnregister and torch's pinned check (no CUDA
    here): records each call; `refuse` holds the flags it refuses, `pinned` what is_pinned says."""

    def __init__(self, monkeypatch, refuse=(), pinned=True):
        self.registered, self.unregistered, self.refuse = [], [], set(refuse)
        monkeypatch.setattr(disk_io.torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(disk_io, "host_register", self.register)
        monkeypatch.setattr(disk_io, "host_unregister", self.unregistered.append)
        monkeypatch.setattr(disk_io, "_is_pinned", lambda t: pinned)

    def register(self, ptr, nbytes, flags):
        self.registered.append((ptr, nbytes, flags))
        return flags not in self.refuse


def test_a_mapped_weight_is_registered_once_read_only_and_unregistered_on_close(tmp_path,
                                                                               monkeypatch):
    cuda = FakeCudaRegistry(monkeypatch)
    disk = DiskDevice(str(tmp_path), "mmap")
    f = disk.put(_values((8, 16), torch.float16)).data
    first, second = f.pinned_view(), f.pinned_view()
    ptr = f.mapped().ctypes.data
    assert cuda.registered == [(ptr, PAGE, 8)]   # once, whole pages, read-only (cudaHostRegisterReadOnly)
    assert first.data_ptr() == second.data_ptr() == ptr     # the mapping itself: no host copy
    assert _same_bits(first, _values((8, 16), torch.float16))
    disk.close()                                            # closes every file it handed out
    assert cuda.unregistered == [ptr]


def test_a_refused_registration_falls_back_or_gives_none(tmp_path, monkeypatch):
    """Read-only refused: a raw file (a shared mapping) registers plainly; an np.save file (mapped
    copy-on-write, which a writable pin would copy page by page) is not registered. Each file is
    tried once; a registration torch does not see as pinned is undone."""
    cuda = FakeCudaRegistry(monkeypatch, refuse={8})
    disk = DiskDevice(str(tmp_path), "mmap")
    raw = disk.put(_values((4, 4), torch.float32)).data
    assert raw.pinned_view() is not None and [c[2] for c in cuda.registered] == [8, 0]
    np.save(tmp_path / "w.npy", np.ones((4, 4), np.float32))
    npy = disk.file(str(tmp_path / "w.npy"), (4, 4), torch.float32, npy=True)
    assert npy.pinned_view() is None and npy.pinned_view() is None
    assert [c[2] for c in cuda.registered] == [8, 0, 8]
    disk.close()
    unpinned = FakeCudaRegistry(monkeypatch, pinned=False)
    disk = DiskDevice(str(tmp_path), "mmap")
    f = disk.put(_values((4, 4), torch.float32)).data
    assert f.pinned_view() is None
    assert unpinned.unregistered == [f.mapped().ctypes.data]
    disk.close()


def test_an_np_save_file_registers_the_whole_pages_around_its_data(tmp_path, monkeypatch):
    """Its data starts after the file's header, inside the mapping's first page."""
    cuda = FakeCudaRegistry(monkeypatch)
    disk = DiskDevice(str(tmp_path), "mmap")
    np.save(tmp_path / "w.npy", np.arange(3000, dtype=np.float32))
    f = disk.file(str(tmp_path / "w.npy"), (3000,), torch.float32, npy=True)
    assert torch.equal(f.pinned_view(), torch.arange(3000, dtype=torch.float32))
    ((start, nbytes, flags),) = cuda.registered
    data = f.mapped().ctypes.data
    assert start % PAGE == 0 and nbytes % PAGE == 0 and flags == 8
    assert start < data and data + 3000 * 4 <= start + nbytes < data + 3000 * 4 + PAGE
    disk.close()
    assert cuda.unregistered == [start]


def test_a_mapping_is_not_pinned_past_half_the_memory_available(tmp_path, monkeypatch):
    cuda = FakeCudaRegistry(monkeypatch)
    disk = DiskDevice(str(tmp_path), "mmap")
    f = disk.put(_values((64, 64), torch.float32)).data      # 16 KiB
    monkeypatch.setattr(disk_io, "available_memory", lambda: 30 << 10)
    assert f.pinned_view() is None and cuda.registered == []
    disk.close()


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_only_mapped_files_are_registered(tmp_path, monkeypatch, mode):
    cuda = FakeCudaRegistry(monkeypatch)
    disk = DiskDevice(str(tmp_path), mode)
    assert disk.put(_values((4, 4), torch.float32)).data.pinned_view() is None
    assert cuda.registered == []
    disk.close()


def test_a_mapped_weight_bound_for_the_gpu_crosses_from_the_mapping(tmp_path, monkeypatch):
    """Stored.load hands the registered mapping to the copy engine: no read into a host buffer."""
    FakeCudaRegistry(monkeypatch)
    disk = DiskDevice(str(tmp_path), "mmap")
    stored = disk.put(_values((8, 16), torch.float16))
    sent = []
    monkeypatch.setattr(stored.engine, "to_device", lambda t, device, whole=False: sent.append(t) or t)
    monkeypatch.setattr(disk_io.DiskFile, "read", lambda *a, **k: pytest.fail("read a host copy"))
    out = stored.load(torch.device("cuda"))
    assert out.data_ptr() == stored.data.mapped().ctypes.data and len(sent) == 1
    disk.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("npy", [False, True])
def test_a_registered_mapping_crosses_to_the_gpu_bit_exactly(tmp_path, npy):
    """On a GPU: a raw file's and an np.save file's mappings register (torch then sees them as
    pinned), load onto the GPU bit-exactly, and are unregistered on close (a second
    registration of the same range then succeeds)."""
    from flexgen_repro.devices.storage import Stored
    disk = DiskDevice(str(tmp_path), "mmap")
    values = _values((64, 256), torch.float16)
    if npy:
        np.save(tmp_path / "w.npy", values.numpy())
        stored = Stored(Tier.DISK, disk.file(str(tmp_path / "w.npy"), (64, 256), torch.float16,
                                            npy=True), engine=disk.engine)
    else:
        stored = disk.put(values)
    view = stored.data.pinned_view()
    assert view is not None and view.is_pinned()
    out = stored.load(torch.device("cuda"), whole=True)
    torch.cuda.synchronize()
    assert _same_bits(out.cpu(), values)
    ptr, nbytes = view.data_ptr(), view.numel() * view.element_size()
    disk.close()             # `view` keeps the old mapping alive at ptr: registrable again only
    assert disk_io.host_register(ptr, nbytes, 8)   # if close unregistered it
    disk_io.host_unregister(ptr)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_weights_decode_the_same_tokens_every_time(tmp_path):
    """On a GPU: weights on disk (mapped, registered), in host memory and on the GPU give the same
    tokens in three generations each in one process, and the three placements agree; so do three
    generations with 4-bit weights and cache (the fused split-K matmul and 4-bit attention). Dummy
    weights leave near-ties between the top logits, so any kernel whose last bits vary between
    repeats, or a copy racing the compute that reads its buffer, shows as a flipped token."""
    from flexgen_repro import flex_opt
    outs = {}
    for name, pct in (("disk", "0 0 100 0 100 0"), ("host", "0 100 100 0 100 0"),
                      ("gpu", "100 0 100 0 100 0"), ("gpu-4bit", "100 0 100 0 100 0")):
        four_bit = ["--compress-weight", "--compress-cache"] if name == "gpu-4bit" else []
        args = flex_opt.build_parser().parse_args(
            ["--model", "opt-1.3b", "--path", "_DUMMY_", "--offload-dir", str(tmp_path / name),
             "--percent", *pct.split(), "--gpu-batch-size", "16", "--num-gpu-batches", "1",
             "--prompt-len", "128", "--gen-len", "16", "--cuda-graphs", "false", *four_bit])
        try:
            with flex_opt.prepared(args) as ready:
                outs[name] = [np.asarray(ready.lm.generate(ready.prompts, max_new_tokens=16))
                              for _ in range(3)]
        finally:
            gc.unfreeze()          # prepared() freezes the collector for a measured run
    for name, runs in outs.items():
        for run in runs[1:]:
            np.testing.assert_array_equal(run, runs[0], err_msg=name)
    np.testing.assert_array_equal(outs["disk"][0], outs["host"][0])
    np.testing.assert_array_equal(outs["disk"][0], outs["gpu"][0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_attention_repeats_bit_for_bit():
    """The resident cache's decode attention, given the same inputs 20 times, returns the same
    bits every time, whatever the unwritten (masked) tail of the cache holds."""
    from flexgen_repro.model.layers import _fused_decode
    g = torch.Generator(device="cuda").manual_seed(0)
    b, heads, d, length, written = 16, 32, 64, 144, 129
    q, k, v = (torch.randn(b, heads, n, d, device="cuda", dtype=torch.float16, generator=g)
               for n in (1, length, length))
    mask = torch.zeros(b, length, dtype=torch.bool, device="cuda")
    mask[:, :written] = True
    ref = _fused_decode(q, k, v, mask, 0.125)
    assert all(torch.equal(_fused_decode(q, k, v, mask, 0.125), ref) for _ in range(20))
    k[:, :, written:] = 1e3
    v[:, :, written:] = -1e3
    assert torch.equal(_fused_decode(q, k, v, mask, 0.125), ref)


def _record_opens(monkeypatch, refuse_direct=False):
    opened, real_open = [], os.open

    def fake_open(path, flags, *args):
        direct = bool(flags & getattr(os, "O_DIRECT", 0))
        opened.append(direct)
        if direct and refuse_direct:
            raise OSError(22, "Invalid argument")   # what tmpfs answers
        return real_open(path, flags, *args)
    monkeypatch.setattr(disk_io.os, "open", fake_open)
    return opened


@pytest.mark.skipif(not HAS_DIRECT, reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("numel", NUMELS)
def test_direct_mode_uses_o_direct_for_whole_blocks_only(tmp_path, monkeypatch, numel):
    if not disk_io.accepts_direct(str(tmp_path)):
        pytest.skip("this filesystem refuses O_DIRECT")
    disk = DiskDevice(str(tmp_path), "direct")
    values = _values((numel,), torch.float16, seed=4)
    f = disk.alloc((numel,), torch.float16)
    opened = _record_opens(monkeypatch)
    f.write(Ellipsis, values)
    got = f.read()
    assert _same_bits(got, values) and got.data_ptr() % disk_io.DIRECT_ALIGN == 0
    nbytes = numel * 2
    whole, tail = nbytes >= disk_io.DIRECT_ALIGN, nbytes % disk_io.DIRECT_ALIGN > 0
    assert opened == ([True] * whole + [False] * tail) * 2      # the write, then the read
    disk.close()


def test_direct_mode_falls_back_to_buffered_where_refused(tmp_path, monkeypatch):
    disk = DiskDevice(str(tmp_path), "direct")
    values = _values((5000,), torch.float16, seed=5)
    f = disk.alloc((5000,), torch.float16)
    opened = _record_opens(monkeypatch, refuse_direct=HAS_DIRECT)
    f.write(Ellipsis, values)
    assert _same_bits(f.read(), values)
    assert opened[-1] is False and opened.count(False) == 2
    npy = disk.file(str(tmp_path / "w.npy"), (5000,), torch.float16, npy=True)
    np.save(tmp_path / "w.npy", values.numpy())                # data after a 128-byte header
    opened.clear()
    assert _same_bits(npy.read(), values) and opened == [False]  # not block-aligned: buffered
    disk.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or disk_io.mount_of("/dev/shm")[0] != "tmpfs",
                    reason="no tmpfs at /dev/shm")
def test_auto_maps_files_on_tmpfs_and_says_why():
    import tempfile
    folder = tempfile.mkdtemp(dir="/dev/shm")
    try:
        disk = DiskDevice(folder, "auto")
        assert disk.io_mode == "mmap" and "tmpfs" in disk.io_reason
    finally:
        os.rmdir(folder)


def test_auto_decides_from_the_filesystem_and_the_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_io, "mount_of", lambda folder: ("overlay", "overlay"))
    assert disk_io.resolve_io_mode(str(tmp_path), "auto")[0] == "mmap"
    monkeypatch.setattr(disk_io, "mount_of", lambda folder: ("xfs", "/dev/nvme0n1"))
    monkeypatch.setattr(disk_io, "accepts_direct", lambda folder: True)
    mode, why = disk_io.resolve_io_mode(str(tmp_path), "auto")
    assert mode == "direct" and "/dev/nvme0n1" in why
    monkeypatch.setattr(disk_io, "accepts_direct", lambda folder: False)
    assert disk_io.resolve_io_mode(str(tmp_path), "auto")[0] == "mmap"
    assert disk_io.resolve_io_mode(str(tmp_path), "buffered") == ("buffered", "asked for")


def test_auto_maps_what_fits_in_the_page_cache_and_streams_the_rest_direct(tmp_path, monkeypatch):
    """On a drive that accepts O_DIRECT, "auto" maps files while the mapped bytes stay within
    PAGE_CACHE_SHARE of the available memory (memory speed), and reads the rest with O_DIRECT."""
    monkeypatch.setattr(disk_io, "mount_of", lambda folder: ("xfs", "/dev/nvme0n1"))
    monkeypatch.setattr(disk_io, "accepts_direct", lambda folder: True)
    monkeypatch.setattr(tiers, "available_memory", lambda: 10_000)   # bytes: 5,000 may be mapped
    disk = DiskDevice(str(tmp_path), "auto")
    assert disk.io_mode == "direct" and "mapped while they fit" in disk.io_reason
    first = disk.alloc((1000,), torch.float16)     # 2,000 bytes: mapped
    second = disk.alloc((1000,), torch.float32)    # 4,000 more would pass 5,000: direct
    third = disk.alloc((500,), torch.float16)      # 1,000 more: 3,000 mapped, within the share
    assert (first.io, second.io, third.io) == ("mmap", "direct", "mmap")
    assert disk.bytes_by_mode == {"mmap": 3000, "direct": 4000}
    assert "mmap 0.00 GiB" in disk.describe() and "direct 0.00 GiB" in disk.describe()
    values = torch.arange(1000, dtype=torch.float32)
    second.write(Ellipsis, values)
    assert torch.equal(second.read(), values)
    disk.close()
    # asked-for modes are kept for every file whatever the memory
    fixed = DiskDevice(str(tmp_path), "direct")
    assert fixed.alloc((1000,), torch.float16).io == "direct"
    fixed.close()


def test_available_memory_reads_meminfo():
    n = disk_io.available_memory()
    assert n > 0 if os.path.exists("/proc/meminfo") else n == 0


def test_two_environments_share_nothing(tmp_path):
    """Each environment has its own copy engine (link gate, staging rings) and channels; closing
    one leaves the other's channels, files and copies working."""
    a = ExecutionEnv.create(str(tmp_path / "a"), options=RuntimeOptions(disk_io="mmap"))
    b = ExecutionEnv.create(str(tmp_path / "b"), options=RuntimeOptions(disk_io="buffered"))
    assert a.engine is not b.engine and a.engine.gate is not b.engine.gate
    assert a.engine.ring is not b.engine.ring
    assert a.channel("weight") is not b.channel("weight")
    assert a.disk.io_mode == "mmap" and b.disk.io_mode == "buffered"
    a.engine.gate.register(object())                    # pending in a's gate only
    assert b.engine.gate._pending == []
    sa, sb = a.disk.put(torch.arange(10.0)), b.disk.put(torch.arange(10.0) * 2)
    assert sa.engine is a.engine and sb.engine is b.engine
    a.close()
    assert not os.path.exists(sa.data.path)
    fut = b.channel("weight").submit(lambda: sb.load(torch.device("cpu")))
    assert torch.equal(fut.result(), torch.arange(10.0) * 2)
    b.close()


# --- the runtime under each mode -------------------------------------------------------------

GEN = 5
DISK_PLACEMENTS = [  # (w_gpu, w_cpu, cache_gpu, cache_cpu, act_gpu, act_cpu, cpu_cache_compute)
    (0, 0, 0, 0, 0, 0, False),          # everything on disk
    (100, 0, 0, 0, 100, 0, True),       # cache on disk, attention on the CPU over it
    (0, 50, 30, 30, 50, 0, True),       # weights and cache split with the disk
]


@pytest.fixture(scope="module")
def tiny(tiny_opt):
    model, ckpt, weights = tiny_opt
    config = get_opt_config(ckpt, dtype=np.float32)
    prompts = random_prompts(5, 8, config.vocab_size, seed=2, pad_rows=2)
    return config, weights, prompts, hf_greedy(model, prompts, GEN)


@pytest.mark.parametrize("mode", MODES + ["auto"])
@pytest.mark.parametrize("placement", range(len(DISK_PLACEMENTS)))
def test_runtime_is_token_identical_under_each_disk_io_mode(tiny, tmp_path, mode, placement):
    config, weights, prompts, expected = tiny
    *pct, cpu_attn = DISK_PLACEMENTS[placement]
    for overlap, k in ((False, 1), (True, 2)):
        pol = Policy(gpu_batch_size=2, num_gpu_batches=k, w_gpu_percent=pct[0], w_cpu_percent=pct[1],
                     cache_gpu_percent=pct[2], cache_cpu_percent=pct[3], act_gpu_percent=pct[4],
                     act_cpu_percent=pct[5], overlap=overlap, cpu_cache_compute=cpu_attn)
        with ExecutionEnv.create(str(tmp_path / "off"), options=RuntimeOptions(disk_io=mode)) as env:
            assert env.disk.io_mode in MODES
            out = OptLM(config, env, weights, pol).generate(prompts, max_new_tokens=GEN)
        np.testing.assert_array_equal(out, expected)


def test_disk_io_bench_times_cache_attention_in_each_mode(tmp_path):
    """scripts/disk_io_bench.py --cache-attention: one row per I/O mode, the runtime's read path
    and a host copy both timed (what docs/tuning-devices.md reports)."""
    import json
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "disk_io_bench.py")
    out = subprocess.run([sys.executable, script, "--folder", str(tmp_path), "--cache-attention",
                          "--reps", "1"], capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["mode"] for r in rows] == ["direct", "buffered", "mmap"]
    assert all(r[key] > 0 for r in rows for key in ("ms_per_layer", "ms_per_layer_over_a_copy",
                                                     "prefill_store_ms", "prefill_store_ms_numpy"))
    assert all(r["shape"] == [16, 32, 544, 64] for r in rows)
