"""Decode as one CUDA graph per GPU batch, for policies that keep everything on the GPU.

With weights, cache and activations resident there is nothing to move, and small-batch decode is
bound by kernel launches, not by the GPU. The same layers run with static inputs (token ids,
positions, a mask over the whole preallocated cache, the write position as a device tensor): each
attention layer writes the new key and value into its home buffer and attends over all of it
with the unwritten positions masked. Captured once per GPU batch and block, replayed per token.
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch

from flexgen_repro.model.base import CachePart, StepInfo
from flexgen_repro.policy import Policy, Tier

# Decode tokens queued back to back (FLEXGEN_GRAPH_PIPELINE=0: each step waits for its ids on the
# host and copies its inputs from there): the host collects token i's ids while token i + 1 runs.
PIPELINE = os.environ.get("FLEXGEN_GRAPH_PIPELINE", "1") != "0"
# q, k and v projections of each layer as one GEMM in graphed decode (FLEXGEN_FUSE_QKV=0: three,
# for side-by-side runs). Their GPU homes become views of one buffer: no extra memory.
FUSE_QKV = os.environ.get("FLEXGEN_FUSE_QKV", "1") != "0"


def graphable(policy: Policy, env, want_logits: bool) -> bool:
    """Only where nothing moves between tiers during decode."""
    return (env.has_cuda and not want_logits and policy.attn_sparsity == 1.0
            and policy.w_gpu_percent == 100 and policy.cache_gpu_percent == 100
            and policy.act_gpu_percent == 100)


def fuse_qkv(home: dict) -> dict:
    """Re-home a layer's GPU-resident w_q, w_k, w_v (and b_q, b_k, b_v) as row slices of one
    buffer each; return {"w_qkv", "b_qkv"} (views of those buffers), or {} where the layer has
    no such weights or any of them is compressed or elsewhere. Idempotent."""
    names = [f"{p}_{n}" for p in "wb" for n in "qkv"]
    if not all(n in home for n in names):
        return {}
    stored = [home[n] for n in names]
    if any(s.tier != Tier.GPU or s.parts or not isinstance(s.data, torch.Tensor) for s in stored):
        return {}
    fused = {}
    for p in "wb":
        parts = [home[f"{p}_{n}"].data for n in "qkv"]
        rows = parts[0].shape[0]
        base = parts[0]._base
        if (base is not None and base.shape[0] == 3 * rows and parts[0].data_ptr() == base.data_ptr()
                and all(t._base is base for t in parts)):
            fused[f"{p}_qkv"] = base   # fused by an earlier capture
            continue
        whole = torch.cat(parts)
        for i, n in enumerate("qkv"):
            home[f"{p}_{n}"].data = whole[i * rows:(i + 1) * rows]
        fused[f"{p}_qkv"] = whole
    return fused


def _full_buffer(row_split):
    """The GPU home buffer of a one-segment cache tensor (plain or compressed)."""
    (seg,) = row_split.segments
    store = seg.store
    if hasattr(store, "buf"):
        return store.buf
    from flexgen_repro.compression import CompressedTensor
    comps = {name: s.buf for name, s in store.stores.items()}
    return CompressedTensor.from_components(comps, store.meta)


class GraphedDecode:
    """Captured decode steps of one block: `step(i, k)` fills the static inputs and replays."""

    def __init__(self, run):
        self.run = run  # the BlockRun being decoded (set anew for each block)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.static: dict[int, dict] = {}
        self.pool = None
        self.picked: dict[int, torch.Tensor] = {}      # pipelined: last picked ids per batch
        self.last: dict[int, int] = {}                 # pipelined: last token queued per batch
        self.host_ids: dict[tuple, torch.Tensor] = {}  # pinned, per (token parity, batch)
        self.in_flight: dict[int, list] = defaultdict(list)

    def start_block(self, run) -> None:
        """A new block reuses the graphs; its inputs start from the host again."""
        self.run = run
        self.last.clear()
        self.in_flight.clear()

    def _inputs(self, i: int, k: int) -> dict:
        """This step's ids, positions, full-length mask and write index, on the GPU."""
        run = self.run
        dev = run.env.gpu.dev
        info = run.step_info(i, k)
        b = run.B
        total = run.prompt_len + run.gen_len
        mask = torch.zeros(b, total, dtype=torch.bool, device=dev)
        mask[:, :info.mask.shape[1]] = info.mask
        ids = run.load_hidden(i, 0, k)
        return dict(ids=ids, pos=info.positions, mask=mask,
                    index=torch.tensor([run.prompt_len + i - 1], device=dev))

    def _body(self, k: int) -> None:
        run, st = self.run, self.static[k]
        step = StepInfo(1, run.prompt_len, st["mask"], st["pos"], 1.0, pick=lambda logits: logits)
        x = st["ids"]
        for j, layer in enumerate(run.layers):
            w = st["weights"][j]
            if layer.has_cache:
                k_home, v_home = st["homes"][j]
                part = CachePart(0, run.B, run.env.gpu.dev, k_home, v_home, True, st["index"])
                x, _ = layer.forward(x, w, step, [part])
            else:
                x = layer.forward(x, w, step)
        st["logits"] = x

    def _capture(self, k: int) -> None:
        run, st = self.run, self.static[k]
        gpu = run.env.gpu.dev
        st["weights"] = []
        for home in run.lm.weight_home:
            extra = fuse_qkv(home) if FUSE_QKV else {}
            if extra:
                torch.cuda.empty_cache()  # the three old buffers go back before the next layer's
            st["weights"].append({**{key: s.load(gpu) for key, s in home.items()}, **extra})
        st["homes"] = {j: tuple(_full_buffer(t) for t in run.cache_home[(j, k)])
                       for j, layer in enumerate(run.layers) if layer.has_cache}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: this step's real work, idempotent when replayed
            self._body(k)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._body(k)
        self.pool = graph.pool()
        self.graphs[k] = graph

    def queue(self, i: int, k: int) -> None:
        """Queue token i of GPU batch k without waiting for anything: where batch k replayed token
        i - 1 last, its next inputs are made on the GPU from that step's (ids picked there, one
        position and one mask column on, write index on), else copied from the host. The picked
        ids go to a pinned buffer; `collect(i)` writes them into output_ids.

        A row that stopped (its output is padding from then on) is fed its own picked token rather
        than the pad token the host would feed; rows never mix, so every other row is unchanged."""
        run = self.run
        if self.last.get(k) == i - 1 and k in self.graphs:
            st = self.static[k]
            st["ids"].copy_(self.picked[k].view_as(st["ids"]))
            st["pos"].add_(1)
            st["mask"][:, run.prompt_len + i - 1] = True
            st["index"].add_(1)
            self.graphs[k].replay()
            ids = run.pick(st["logits"])
        else:
            ids = self._from_host(i, k)
        self.picked[k], self.last[k] = ids, i
        key = (i % 2, k)
        if key not in self.host_ids or self.host_ids[key].shape != ids.shape:
            self.host_ids[key] = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        self.host_ids[key].copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.in_flight[i].append((k, self.host_ids[key], done))

    def collect(self, i: int) -> None:
        """Wait for token i's picked ids (every GPU batch) and write them into output_ids."""
        for k, host, done in self.in_flight.pop(i, []):
            done.synchronize()
            self.run.record_ids(i, k, host.numpy())

    def _from_host(self, i: int, k: int) -> torch.Tensor:
        """Token i of batch k with its inputs copied from the host (captured at first use);
        returns the picked ids, on the GPU."""
        fresh = self._inputs(i, k)
        if k not in self.graphs:
            self.static[k] = dict(fresh)
            self._capture(k)
        else:
            for name, t in fresh.items():
                self.static[k][name].copy_(t)
        self.graphs[k].replay()
        return self.run.pick(self.static[k]["logits"])

    def step(self, i: int, k: int) -> None:
        """Decode token i of GPU batch k and record the picked ids (waiting for them)."""
        self.run.record_ids(i, k, self._from_host(i, k).cpu().numpy())
