"""Group-wise quantization of weights and the KV cache: the pure-torch reference quantizer.

`compress(x, config)` splits dimension g = config.group_dim of x into groups of `group_size`
values (the last group padded by repeating the dimension's last value), and stores per group an
offset `mn` and a step `scale`, both in x's dtype, plus one `num_bits` code q per value:

    x ~= (q - zero) * scale + mn
    asymmetric: mn = group min, scale = (max - min) / (2**b - 1),  zero = 0,          q in [0, 2**b - 1]
    symmetric:  mn = 0,         scale = max|x| / (2**(b-1) - 1),   zero = 2**(b-1)-1, q in [0, 2*zero]

A group whose max equals its min is stored with scale 0 and mn = its value (also when symmetric),
so it decodes exactly. The step is rounded *up* to the stored dtype, so no code clips and every
element decodes within half a (stored) step, plus the rounding of the result to x's dtype.
Non-finite values give undefined results in their group. The maths runs in float32.

Packing: k = 8 // num_bits codes per byte (2 bits: 4, 3-4 bits: 2, 5-8 bits: 1); a group takes
P = ceil(group_size / k) bytes, and value w of a group (0 <= w < group_size) sits in byte w % P
at bit (w // P) * num_bits ("planar": at 4 bits, byte b holds value b in its low nibble and value
b + P in its high nibble).

Layout (so a compressed cache can be sliced along any other dimension): with
n_groups = ceil(shape[g] / group_size),
    data:      shape[:g] + (n_groups, P) + shape[g+1:]   uint8
    scale, mn: shape[:g] + (n_groups, 1) + shape[g+1:]   x's dtype
so a dimension d < g of data/scale/mn is dimension d of x, and a dimension d > g is d + 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexgen_repro.policy import CompressionConfig

# Elements handled per chunk of compress/decompress, bounding float32 temporaries (~16 B each).
CHUNK_ELEMENTS = 1 << 24
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def values_per_byte(num_bits: int) -> int:
    """How many codes one byte holds."""
    return 8 // num_bits


def bytes_per_group(config: CompressionConfig) -> int:
    """P: packed bytes per group."""
    return -(-config.group_size // values_per_byte(config.num_bits))


def zero_point(config: CompressionConfig) -> int:
    """The code that stands for an offset of zero steps (0 when asymmetric)."""
    return (1 << (config.num_bits - 1)) - 1 if config.symmetric else 0


def max_code(config: CompressionConfig) -> int:
    return 2 * zero_point(config) if config.symmetric else (1 << config.num_bits) - 1


def group_dim_of(config: CompressionConfig, ndim: int) -> int:
    """config.group_dim normalized for a tensor of `ndim` dimensions."""
    g = config.group_dim
    if not -ndim <= g < ndim:
        raise ValueError(f"CompressionConfig.group_dim={g} is out of range for a {ndim}-D tensor "
                         f"(valid: {-ndim}..{ndim - 1})")
    return g % ndim


def compressed_shapes(shape, config: CompressionConfig):
    """(data shape, scale/mn shape) of a tensor of `shape` compressed with `config`."""
    shape = tuple(int(s) for s in shape)
    g = group_dim_of(config, len(shape))
    n_groups = -(-shape[g] // config.group_size)
    pre, post = shape[:g], shape[g + 1:]
    return pre + (n_groups, bytes_per_group(config)) + post, pre + (n_groups, 1) + post


def compressed_nbytes(shape, config: CompressionConfig, dtype_bytes: int) -> int:
    """Bytes stored for a tensor of `shape` and element size `dtype_bytes` (data + scale + mn)."""
    data_shape, scale_shape = compressed_shapes(shape, config)
    return math.prod(data_shape) + 2 * math.prod(scale_shape) * dtype_bytes


@dataclass
class CompressedTensor:
    """A group-wise quantized tensor (layout in the module docstring); all pieces on one device.

    `scale` is the quantization step and `mn` the offset: x ~= (q - zero_point) * scale + mn.
    """
    data: torch.Tensor
    scale: torch.Tensor
    mn: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    config: CompressionConfig

    @property
    def group_dim(self) -> int:
        return group_dim_of(self.config, len(self.shape))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.mn))

    def _with(self, data, scale, mn, shape=None) -> "CompressedTensor":
        return CompressedTensor(data, scale, mn, tuple(shape or self.shape), self.dtype, self.config)

    def to(self, device, non_blocking: bool = False) -> "CompressedTensor":
        return self._with(*(t.to(device, non_blocking=non_blocking) for t in self.components().values()))

    def pin_memory(self) -> "CompressedTensor":
        return self._with(*(t.pin_memory() for t in self.components().values()))

    def components(self) -> dict[str, torch.Tensor]:
        """The stored pieces by name, for keeping each on disk or another tier."""
        return {"data": self.data, "scale": self.scale, "mn": self.mn}

    def meta(self) -> tuple[tuple[int, ...], torch.dtype, CompressionConfig]:
        """(shape, dtype, config): with `components()`, all that `from_components` needs."""
        return tuple(self.shape), self.dtype, self.config

    @classmethod
    def from_components(cls, components: dict[str, torch.Tensor], shape, dtype: torch.dtype | None = None,
                        config: CompressionConfig | None = None) -> "CompressedTensor":
        """Rebuild from `components()` and the metadata, given as (shape, dtype, config) or as
        `meta()`'s tuple in place of shape; checks the pieces' shapes."""
        if dtype is None and config is None:
            shape, dtype, config = shape
        data_shape, scale_shape = compressed_shapes(shape, config)
        for name, want in (("data", data_shape), ("scale", scale_shape), ("mn", scale_shape)):
            if tuple(components[name].shape) != want:
                raise ValueError(f"CompressedTensor component {name!r} has shape "
                                 f"{tuple(components[name].shape)}, expected {want} for a tensor of "
                                 f"shape {tuple(shape)} compressed with {config}")
        return cls(components["data"], components["scale"], components["mn"],
                   tuple(int(s) for s in shape), dtype, config)

    @classmethod
    def empty(cls, shape, config: CompressionConfig, dtype: torch.dtype, device="cpu",
              pin_memory: bool = False) -> "CompressedTensor":
        """An uninitialized buffer, to be filled with `write_` (e.g. a compressed KV cache)."""
        data_shape, scale_shape = compressed_shapes(shape, config)
        kw = dict(device=device, pin_memory=pin_memory)
        return cls(torch.empty(data_shape, dtype=torch.uint8, **kw),
                   torch.empty(scale_shape, dtype=dtype, **kw),
                   torch.empty(scale_shape, dtype=dtype, **kw),
                   tuple(int(s) for s in shape), dtype, config)

    def _stored_dim(self, dim: int) -> int:
        dim = dim % len(self.shape)
        if dim == self.group_dim:
            raise ValueError(f"cannot slice a CompressedTensor along its group dimension {dim}; "
                             "decompress it first or group along another dimension")
        return dim if dim < self.group_dim else dim + 1

    def narrow(self, dim: int, start: int, length: int) -> "CompressedTensor":
        """A view of x.narrow(dim, start, length) (dim in x's coordinates, not the group dim)."""
        sd = self._stored_dim(dim)
        shape = list(self.shape)
        shape[dim % len(shape)] = length
        return self._with(self.data.narrow(sd, start, length), self.scale.narrow(sd, start, length),
                          self.mn.narrow(sd, start, length), shape)

    def copy_(self, other: "CompressedTensor", non_blocking: bool = False) -> "CompressedTensor":
        """Copy `other` (same shape and config) into this tensor's storage, in place."""
        if tuple(other.shape) != tuple(self.shape) or other.config != self.config:
            raise ValueError(f"copy_ needs the same shape and config: {other.shape} {other.config} "
                             f"into {self.shape} {self.config}")
        for mine, theirs in zip(self.components().values(), other.components().values()):
            mine.copy_(theirs, non_blocking=non_blocking)
        return self

    def write_(self, dim: int, start: int, other: "CompressedTensor",
               non_blocking: bool = False) -> "CompressedTensor":
        """Write `other` into positions start.. along `dim` (e.g. new tokens into a cache buffer)."""
        return self.narrow(dim, start, other.shape[dim % len(self.shape)]).copy_(other, non_blocking)


def _round_up_to(step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `step` (>= 0) as the nearest value of `dtype` that is not smaller."""
    stored = step.to(dtype)
    if torch.finfo(dtype).bits >= 32:
        return stored
    bumped = (stored.view(_INT_OF[stored.element_size()]) + 1).view(dtype)
    return torch.where(stored.float() < step, bumped, stored)


def _check(tensor: torch.Tensor, config: CompressionConfig) -> int:
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"compress needs a CompressionConfig, got {type(config).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"compress needs a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() == 0 or tensor.numel() == 0:
        raise ValueError(f"compress needs a non-empty tensor with at least one dimension, "
                         f"got shape {tuple(tensor.shape)}")
    return group_dim_of(config, tensor.dim())


def _as_3d(shape, g):
    return math.prod(shape[:g]), shape[g], math.prod(shape[g + 1:])


def _chunks(a: int, c: int, per_row: int):
    """Slices over the A and C axes of an (A, *, C) view, each of about CHUNK_ELEMENTS."""
    if a > 1:
        step = max(1, CHUNK_ELEMENTS // max(1, per_row * c))
        return [(slice(i, min(a, i + step)), slice(None)) for i in range(0, a, step)]
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    return [(slice(None), slice(j, min(c, j + step))) for j in range(0, c, step)]


def _quantize(x: torch.Tensor, config: CompressionConfig, dtype: torch.dtype):
    """x: (A, n_groups, group_size, C) float32 -> codes (uint8), scale, mn ((A, n_groups, 1, C))."""
    zero, top = zero_point(config), max_code(config)
    mx = x.amax(dim=2, keepdim=True)
    mn = x.amin(dim=2, keepdim=True)
    # divide by a tensor, not a Python number: CUDA turns division by a scalar into a multiply by
    # its reciprocal (one float32 ulp off at times), and then the rounded-up stored step can differ
    # from the CPU's and the fused quantize kernel's (both divide exactly)
    if config.symmetric:
        step = torch.maximum(mx.abs(), mn.abs()) / torch.full_like(mx, zero)
        const = mx == mn
        offset = torch.where(const, mx, torch.zeros_like(mx))
        step = torch.where(const, torch.zeros_like(step), step)
    else:
        step, offset = (mx - mn) / torch.full_like(mx, top), mn
    step_s, offset_s = _round_up_to(step, dtype), offset.to(dtype)
    step32, offset32 = step_s.float(), offset_s.float()
    safe = torch.where(step32 > 0, step32, torch.ones_like(step32))
    q = torch.floor((x - offset32) / safe + 0.5) + zero
    q = torch.where(step32 > 0, q, torch.full_like(q, zero)).clamp_(0, top)
    return q.to(torch.uint8), step_s, offset_s


def _pack(q: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """codes (A, n_groups, group_size, C) -> bytes (A, n_groups, P, C)."""
    k, p = values_per_byte(config.num_bits), bytes_per_group(config)
    if k * p != q.shape[2]:
        q = torch.nn.functional.pad(q, (0, 0, 0, k * p - q.shape[2]))
    q = q.view(q.shape[0], q.shape[1], k, p, q.shape[3])
    out = q[:, :, 0].clone()
    for j in range(1, k):
        out |= q[:, :, j] << (j * config.num_bits)
    return out


def compress(tensor: torch.Tensor, config: CompressionConfig) -> CompressedTensor:
    """Group-wise quantize `tensor` (any float dtype, any device) into a CompressedTensor."""
    g = _check(tensor, config)
    shape, dtype, gs = tuple(tensor.shape), tensor.dtype, config.group_size
    a, length, c = _as_3d(shape, g)
    n_groups = -(-length // gs)
    data_shape, scale_shape = compressed_shapes(shape, config)
    out = CompressedTensor.empty(shape, config, dtype, tensor.device)
    x3 = tensor.reshape(a, length, c)
    data3 = out.data.view(a, n_groups, -1, c)
    scale3, mn3 = out.scale.view(a, n_groups, 1, c), out.mn.view(a, n_groups, 1, c)
    for ia, ic in _chunks(a, c, n_groups * gs):
        x = x3[ia, :, ic].float()
        if n_groups * gs != length:  # pad by repeating the last value: group stats unchanged
            x = torch.cat([x, x[:, -1:].expand(-1, n_groups * gs - length, -1)], dim=1)
        q, step, offset = _quantize(x.view(x.shape[0], n_groups, gs, x.shape[2]), config, dtype)
        data3[ia, :, :, ic] = _pack(q, config)
        scale3[ia, :, :, ic] = step
        mn3[ia, :, :, ic] = offset
    return out


def _unpack(data: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """bytes (A, n_groups, P, C) -> codes (A, n_groups, group_size, C) as uint8."""
    k, bits = values_per_byte(config.num_bits), config.num_bits
    mask = (1 << bits) - 1
    parts = [(data >> (j * bits)) & mask for j in range(k)] if k > 1 else [data]
    return torch.cat(parts, dim=2)[:, :, :config.group_size]


def decompress(packed: CompressedTensor) -> torch.Tensor:
    """The tensor `packed` stands for: original shape and dtype, on packed's device."""
    config, shape, g = packed.config, packed.shape, packed.group_dim
    a, length, c = _as_3d(shape, g)
    n_groups, gs = -(-length // config.group_size), config.group_size
    data3 = packed.data.reshape(a, n_groups, -1, c)
    scale3, mn3 = packed.scale.reshape(a, n_groups, 1, c), packed.mn.reshape(a, n_groups, 1, c)
    out = torch.empty((a, length, c), dtype=packed.dtype, device=packed.device)
    zero = float(zero_point(config))
    for ia, ic in _chunks(a, c, n_groups * gs):
        q = _unpack(data3[ia, :, :, ic], config).float()
        x = (q - zero) * scale3[ia, :, :, ic].float() + mn3[ia, :, :, ic].float()
        out[ia, :, ic] = x.reshape(x.shape[0], n_groups * gs, x.shape[3])[:, :length]
    return out.view(shape)
