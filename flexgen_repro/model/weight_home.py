"""Put every layer's weights at home: read from a weight folder (or made as dummy values), cast to
the run's dtype, compressed when the policy says so, and stored on the tier `place_weights` chose.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import torch

from flexgen_repro.devices.storage import Stored
from flexgen_repro.model.base import Layer, WeightSpec
from flexgen_repro.policy import Policy, Tier, place_weights

DUMMY = "_DUMMY_"
DUMMY_STD = 0.02   # OPT's init scale: keeps fp16 activations finite and non-trivial


class DummySource:
    """Fast, reproducible, non-constant values: one random pool, tiled per tensor from an offset."""

    POOL = 1 << 20

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(self.POOL, generator=g) * DUMMY_STD

    def make(self, spec: WeightSpec, dtype: torch.dtype, device=None) -> torch.Tensor:
        """Values for `spec`; on a CUDA `device` they are drawn there directly (fast)."""
        if spec.kind == "ln_weight":
            return torch.ones(spec.shape, dtype=dtype, device=device)
        scale = 0.1 if spec.kind in ("ln_bias", "bias") else 1.0
        if device is not None and torch.device(device).type == "cuda":
            g = torch.Generator(device=device).manual_seed(zlib.crc32(spec.file.encode()))
            t = torch.randn(spec.shape, generator=g, device=device, dtype=torch.float32)
            return (t * (DUMMY_STD * scale)).to(dtype)
        return (self._tiled(spec, dtype) * scale).to(device or "cpu")

    def _tiled(self, spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        start = zlib.crc32(spec.file.encode()) % self.POOL
        reps = -(-(spec.numel + start) // self.POOL)
        flat = self.pool.repeat(reps)[start:start + spec.numel]
        return flat.view(spec.shape).to(dtype)


def _compressible(spec: WeightSpec) -> bool:
    return len(spec.shape) >= 2


def stored_bytes(spec: WeightSpec, policy: Policy, dtype_bytes: int) -> int:
    """Bytes a weight takes at home under `policy` (compressed size where it is compressed)."""
    if policy.compress_weight and _compressible(spec):
        from flexgen_repro.compression import compressed_nbytes
        return compressed_nbytes(spec.shape, policy.comp_weight_config, dtype_bytes)
    return spec.numel * dtype_bytes


def _read_folder_tensor(folder: str, spec: WeightSpec) -> np.ndarray:
    path = os.path.join(folder, spec.file)
    arr = np.load(path, mmap_mode="r")
    if tuple(arr.shape) != spec.shape:
        raise ValueError(f"{path} has shape {tuple(arr.shape)}, expected {spec.shape}; "
                         "rerun `invoke prepare-weights` for this model")
    return arr


class WeightLoader:
    """Builds the at-home `Stored` weights of all layers for one (config, env, path, policy)."""

    def __init__(self, env, path: str, folder: str | None, policy: Policy, dtype: torch.dtype,
                 dtype_bytes: int):
        self.env, self.path, self.folder, self.policy = env, path, folder, policy
        self.dtype, self.dtype_bytes = dtype, dtype_bytes
        self.dummy = DummySource() if path == DUMMY else None

    def place(self, layers: list[Layer]) -> tuple[list[dict[str, Stored]], dict[str, float]]:
        """Every layer's weights at home, and the achieved split (percent of bytes per tier)."""
        specs = [layer.specs() for layer in layers]
        sizes = [[stored_bytes(s, self.policy, self.dtype_bytes) for s in row] for row in specs]
        tiers = place_weights(sizes, self.policy.weight_percents())
        homes, by_tier = [], {t.value: 0 for t in Tier}
        for row_specs, row_tiers, row_sizes in zip(specs, tiers, sizes):
            home = {}
            for spec, tier, size in zip(row_specs, row_tiers, row_sizes):
                home[spec.key] = self._store(spec, tier)
                by_tier[tier.value] += size
            homes.append(home)
        total = sum(by_tier.values()) or 1
        return homes, {t: 100.0 * b / total for t, b in by_tier.items()}

    def _values(self, spec: WeightSpec) -> torch.Tensor:
        if self.dummy is not None:  # drawn on the GPU where there is one: fast for any tier
            return self.dummy.make(spec, self.dtype, self.env.gpu.dev)
        arr = _read_folder_tensor(self.folder, spec)
        return torch.from_numpy(np.array(arr)).to(self.dtype)

    def _store(self, spec: WeightSpec, tier: Tier) -> Stored:
        device = self.env.device(tier)
        pin = self.policy.pin_weight
        if self.policy.compress_weight and _compressible(spec):
            from flexgen_repro.compression import compress
            packed = compress(self._values(spec).to(self.env.gpu.dev), self.policy.comp_weight_config)
            parts = {name: device.put(t.cpu() if tier != Tier.GPU else t, pin)
                     for name, t in packed.components().items()}
            return Stored(tier, parts=parts, meta=packed.meta(), engine=self.env.engine)
        if tier == Tier.DISK and self.dummy is None and self._folder_file_usable(spec):
            return Stored(Tier.DISK, self.env.disk.file(os.path.join(self.folder, spec.file),
                                                        spec.shape, self.dtype, npy=True),
                          engine=self.env.engine)
        values = self._values(spec)
        if tier == Tier.GPU and values.device == self.env.gpu.dev and self.dummy is not None:
            return Stored(Tier.GPU, values, engine=self.env.engine)
        return device.put(values, pin)

    def _folder_file_usable(self, spec: WeightSpec) -> bool:
        """A weight-folder file can serve as the disk tier directly when its dtype is the run's."""
        arr = _read_folder_tensor(self.folder, spec)
        return arr.dtype == {torch.float16: np.float16, torch.float32: np.float32}.get(self.dtype)
