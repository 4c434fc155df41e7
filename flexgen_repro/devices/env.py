"""`ExecutionEnv`: the tiers, the copy engine and the copy channels of one run.

Every piece of state the devices need (pinned registrations, the link gate, the staging rings, the
copy threads and streams, the disk tier's files and its I/O mode) belongs to one environment.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch

from flexgen_repro.devices.channels import Channel
from flexgen_repro.devices.copy_engine import CopyEngine
from flexgen_repro.devices.tiers import DiskDevice, MemDevice, MixedDevice
from flexgen_repro.options import RuntimeOptions
from flexgen_repro.policy import Tier

__all__ = ["Channel", "DiskDevice", "ExecutionEnv", "MemDevice", "MixedDevice"]


class ExecutionEnv:
    """The GPU, CPU, disk and mixed devices, the copy engine and the copy channels: every piece of
    state the devices need, so two environments in one process share nothing. A context manager."""

    CHANNELS = ("weight", "weight_disk", "cache_load", "cache_store")

    def __init__(self, gpu: MemDevice, cpu: MemDevice, disk: DiskDevice, own_dir: str | None,
                 options: RuntimeOptions | None = None, engine: CopyEngine | None = None):
        self.gpu, self.cpu, self.disk = gpu, cpu, disk
        self.options = options or RuntimeOptions()
        self.engine = engine or CopyEngine()
        self.mixed = MixedDevice(self)
        self._own_dir = own_dir
        self._channels: dict[str, Channel] = {}
        # Compute runs on a stream of its own, not CUDA's legacy default stream: work on the
        # default stream waits for everything queued on torch's (blocking) pool streams, so a
        # small copy or kernel there would wait for the weight stream's whole queue.
        self.compute_stream = torch.cuda.Stream(gpu.dev) if gpu.dev.type == "cuda" else None

    @classmethod
    def create(cls, offload_dir: str | None = None, gpu_device: str | None = None,
               options: RuntimeOptions | None = None) -> "ExecutionEnv":
        """Make the tiers. `offload_dir` None: a temporary folder (removed on close); `options`:
        the runtime's settings (the disk tier's `disk_io` among them)."""
        options = options or RuntimeOptions()
        cuda = torch.cuda.is_available() and gpu_device != "cpu"
        gdev = torch.device(gpu_device or "cuda:0") if cuda else torch.device("cpu")
        own_dir = None
        if offload_dir is None:
            offload_dir = own_dir = tempfile.mkdtemp(prefix="flexgen_offload_")
        offload_dir = os.path.abspath(os.path.expanduser(offload_dir))
        engine = CopyEngine()
        return cls(MemDevice(Tier.GPU, gdev, False, engine),
                   MemDevice(Tier.CPU, torch.device("cpu"), cuda, engine),
                   DiskDevice(offload_dir, options.disk_io, engine), own_dir, options, engine)

    def computing(self):
        """Context in which the driver queues its GPU work (the compute stream)."""
        return torch.cuda.stream(self.compute_stream) if self.compute_stream is not None \
            else contextlib.nullcontext()

    @property
    def has_cuda(self) -> bool:
        return self.gpu.dev.type == "cuda"

    def device(self, tier: Tier):
        return {Tier.GPU: self.gpu, Tier.CPU: self.cpu, Tier.DISK: self.disk}[Tier(tier)]

    def channel(self, name: str, overlap: bool = True) -> Channel:
        """The copy channel `name`; a new set is made when `overlap` changes."""
        key = f"{name}:{overlap}"
        if key not in self._channels:
            self._channels[key] = Channel(name, self.has_cuda, inline=not overlap)
        return self._channels[key]

    def close_copy_threads(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def close(self) -> None:
        """Join the copy threads and remove every file the disk tier wrote."""
        self.close_copy_threads()
        self.cpu.close()
        self.disk.close()
        if self._own_dir and os.path.isdir(self._own_dir):
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> "ExecutionEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
