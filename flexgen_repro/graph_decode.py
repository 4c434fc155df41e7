"""Decode as one CUDA graph per GPU batch, for policies that keep everything on the GPU.

With weights, cache and activations resident there is nothing to move, and small-batch decode is
bound by kernel launches, not by the GPU. The same layers run with static inputs (token ids,
positions, a mask over the whole preallocated cache, the write position as a device tensor): each
attention layer writes the new key and value into its home buffer and attends over all of it
with the unwritten positions masked. Captured once per GPU batch and block shape, replayed per
token; tokens are queued back to back (the host collects token i's ids while token i + 1 runs).

GraphedDecode sees a block only through `DecodeBlock`; the q, k and v projections are fused into
one GEMM per layer by `fuse_qkv_weights`, a named step of setting graph decode up.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from flexgen_repro.model.base import CachePart, StepInfo
from flexgen_repro.policy import Policy, Tier


@dataclass(frozen=True)
class DecodeBlock:
    """What graph decode needs of one block, and nothing more."""
    layers: list
    batch: int                 # rows per GPU batch
    prompt_len: int
    total_len: int             # the cache buffers' length (at least prompt_len + gen_len)
    device: torch.device
    pick: Callable[[torch.Tensor], torch.Tensor]                       # logits -> ids
    step_inputs: Callable[[int, int], tuple]   # (i, k) -> ids, positions, mask, on the GPU
    cache_homes: Callable[[int], dict]         # k -> {layer j: (k home, v home)}
    record_ids: Callable[[int, int, np.ndarray], None]                 # (i, k, ids)


def graphable(policy: Policy, env, want_logits: bool) -> bool:
    """Only where nothing moves between tiers during decode."""
    return (env.has_cuda and not want_logits and policy.attn_sparsity == 1.0
            and policy.w_gpu_percent == 100 and policy.cache_gpu_percent == 100
            and policy.act_gpu_percent == 100)


def fuse_qkv(home: dict) -> dict:
    """Re-home a layer's GPU-resident w_q, w_k, w_v (and b_q, b_k, b_v where all three exist) as
    row slices of one buffer each; return {"w_qkv"[, "b_qkv"]} (views of those buffers), or {}
    where the layer has no such weights or any of them is compressed or elsewhere. q and k/v may
    have different widths (grouped-query attention). Idempotent."""
    prefixes = [p for p in "wb" if all(f"{p}_{n}" in home for n in "qkv")]
    if "w" not in prefixes:
        return {}
    stored = [home[f"{p}_{n}"] for p in prefixes for n in "qkv"]
    if any(s.tier != Tier.GPU or s.parts or not isinstance(s.data, torch.Tensor) for s in stored):
        return {}
    fused = {}
    for p in prefixes:
        parts = [home[f"{p}_{n}"].data for n in "qkv"]
        rows = [t.shape[0] for t in parts]
        base = parts[0]._base
        if (base is not None and base.shape[0] == sum(rows) and parts[0].data_ptr() == base.data_ptr()
                and all(t._base is base for t in parts)):
            fused[f"{p}_qkv"] = base   # fused earlier
            continue
        whole = torch.cat(parts)
        for n, piece in zip("qkv", whole.split(rows)):
            home[f"{p}_{n}"].data = piece
        fused[f"{p}_qkv"] = whole
    return fused


def fuse_qkv_weights(weight_home: list[dict], device: torch.device) -> list[dict]:
    """Fuse every layer's q, k, v projections (fuse_qkv) and return each layer's weights as loaded
    on `device` for graph decode, with "w_qkv"/"b_qkv" where fused."""
    weights = []
    for home in weight_home:
        before = {key: s.data for key, s in home.items()}
        extra = fuse_qkv(home)
        if any(home[key].data is not t for key, t in before.items()):
            # newly fused: the three old buffers go back before the next layer's (not when fused
            # earlier: emptying the allocator's cache there would make the next block's buffers
            # come from cudaMalloc again)
            torch.cuda.empty_cache()
        weights.append({**{key: s.load(device) for key, s in home.items()}, **extra})
    return weights


class GraphedDecode:
    """Captured decode steps over fused weights: `queue(i, k)` replays token i of GPU batch k,
    `collect(i)` records token i's ids. `start_block` hands it the next block."""

    def __init__(self, weights: list[dict]):
        self.weights = weights
        self.block: DecodeBlock | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.static: dict[int, dict] = {}
        self.pool = None
        self.picked: dict[int, torch.Tensor] = {}      # last picked ids per batch
        self.last: dict[int, int] = {}                 # last token queued per batch
        self.host_ids: dict[tuple, torch.Tensor] = {}  # pinned, per (token parity, batch)
        self.in_flight: dict[int, list] = defaultdict(list)

    def start_block(self, block: DecodeBlock) -> None:
        """A new block reuses the graphs; its inputs start from the host again."""
        self.block = block
        self.last.clear()
        self.in_flight.clear()

    def _inputs(self, i: int, k: int) -> dict:
        """This step's ids, positions, full-length mask and write index, on the GPU."""
        blk = self.block
        ids, pos, step_mask = blk.step_inputs(i, k)
        mask = torch.zeros(blk.batch, blk.total_len, dtype=torch.bool, device=blk.device)
        mask[:, :step_mask.shape[1]] = step_mask
        return dict(ids=ids, pos=pos, mask=mask,
                    index=torch.tensor([blk.prompt_len + i - 1], device=blk.device))

    def _body(self, k: int) -> None:
        st = self.static[k]
        x = st["ids"]
        for j in range(len(self.block.layers)):
            x = self._layer(j, k, x, self.weights[j])
        st["logits"] = x

    def _layer(self, j: int, k: int, x, w: dict):
        """Layer j of batch k on its static inputs: attention writes the new token into its home
        buffer in place and attends over all of it; the last layer returns the logits."""
        blk, st = self.block, self.static[k]
        step = StepInfo(1, blk.prompt_len, st["mask"], st["pos"], 1.0, pick=lambda logits: logits)
        layer = blk.layers[j]
        if not layer.has_cache:
            return layer.forward(x, w, step)
        k_home, v_home = st["homes"][j]
        part = CachePart(0, blk.batch, blk.device, k_home, v_home, True, st["index"])
        return layer.forward(x, w, step, [part])[0]

    def _homes(self, k: int) -> dict:
        """{layer j: (k, v) home buffers} of batch k, which the graphs write and attend."""
        return {j: tuple(t.buffer() for t in home) for j, home in self.block.cache_homes(k).items()}

    def _capture(self, k: int) -> None:
        self.static[k]["homes"] = self._homes(k)
        self.graphs[k] = self._record(k)

    def _record(self, k: int):
        """Run batch k's body once for real, then capture it as a CUDA graph."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: this step's real work, idempotent when replayed
            self._body(k)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._body(k)
        self.pool = graph.pool()
        return graph

    def queue_token(self, i: int, batches: list[int]) -> None:
        """Queue token i of each of `batches` (queue)."""
        for k in batches:
            self.queue(i, k)

    def queue(self, i: int, k: int) -> None:
        """Queue token i of GPU batch k without waiting for anything (_set_inputs); the picked
        ids go to a pinned buffer, and `collect(i)` records them."""
        self._set_inputs(i, k)
        if k not in self.graphs:
            self._capture(k)
        self.graphs[k].replay()
        self._picked(i, k, self.block.pick(self.static[k]["logits"]))

    def _set_inputs(self, i: int, k: int) -> None:
        """Batch k's static inputs for token i: where it ran token i - 1 last, made on the GPU
        from that step's (ids picked there, one position and one mask column on, write index
        on), else copied from the host.

        A row that stopped (its output is padding from then on) is fed its own picked token rather
        than the pad token the host would feed; rows never mix, so every other row is unchanged."""
        blk, st = self.block, self.static.setdefault(k, {})
        if self.last.get(k) == i - 1 and "ids" in st:
            st["ids"].copy_(self.picked[k].view_as(st["ids"]))
            st["pos"].add_(1)
            st["mask"][:, blk.prompt_len + i - 1] = True
            st["index"].add_(1)
            return
        for name, t in self._inputs(i, k).items():
            if name in st:
                st[name].copy_(t)
            else:
                st[name] = t

    def _picked(self, i: int, k: int, ids: torch.Tensor) -> None:
        self.picked[k], self.last[k] = ids, i
        self.in_flight[i].append((k, *self._to_host(i, k, ids)))

    def _to_host(self, i: int, k: int, ids: torch.Tensor) -> tuple:
        """Queue the picked ids' copy to a pinned buffer; (that buffer, an event marking the end)."""
        key = (i % 2, k)
        if key not in self.host_ids or self.host_ids[key].shape != ids.shape:
            self.host_ids[key] = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        self.host_ids[key].copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return self.host_ids[key], done

    def collect(self, i: int) -> None:
        """Wait for token i's picked ids (every GPU batch) and record them."""
        for k, host, done in self.in_flight.pop(i, []):
            done.synchronize()
            self.block.record_ids(i, k, host.numpy())
