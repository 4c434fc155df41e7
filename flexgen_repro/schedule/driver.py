"""The block driver: the paper's Algorithm 1 over (token i, layer j, GPU batch k), one strategy
ordering the steps of each (i, j, k) (strategies.py), the steps on the block's state (steps.py).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from flexgen_repro.graph_decode import DecodeBlock, GraphedDecode, fuse_qkv_weights
from flexgen_repro.graph_stream import StreamedGraphs, WeightSlots, graph_kind
from flexgen_repro.schedule.steps import BlockSteps, torch_threads
from flexgen_repro.schedule.strategies import GraphedPipeline, layer_strategy


class BlockRun(BlockSteps):
    """One block through the driver: `run()` returns its output ids."""

    full_homes: dict | None = None   # the model's held cache homes (set by `_graphed`)
    home_len: int | None = None      # their length, at least this block's cache_len

    def run(self) -> np.ndarray:
        with self.env.computing():
            graphed = self._graphed()
            self.graphed_decode = graphed is not None
            out = generate_block(self, layer_strategy(self.policy), graphed)
        if self.env.has_cuda:  # results leave the compute stream for the caller's
            torch.cuda.current_stream().wait_stream(self.env.compute_stream)
        return out

    def _graphed(self) -> GraphedPipeline | None:
        """Cache homes persist across blocks and calls (no re-allocation, no re-pinning): a GPU
        cache is held at the longest length asked for so far, and a block of a shorter cache
        length uses views of its first positions; a cache elsewhere is kept while the length
        stays the same. Graph decode where everything is on the GPU, or all but the weights,
        which stream from pinned host memory into slots (graph_stream.py): one set of graphs
        per cache length, kept with the homes."""
        state = self.lm.block_state
        held = state.get("home_len")
        if held is None or held < self.cache_len or (held != self.cache_len and not self._viewable()):
            self.lm.release_cache()
            state.update(home_len=self.cache_len, homes={}, graphs={}, weights=None, slots=None)
        self.home_len, self.full_homes = state["home_len"], state["homes"]
        graphs = self._graphs(state) if self.lm.options.cuda_graphs else None
        if graphs is None:
            return None
        graphs.start_block(self.decode_block())
        return GraphedPipeline(graphs)

    def _graphs(self, state: dict) -> GraphedDecode | None:
        """This cache length's graphs (made now if new), or None where decode is not graphed."""
        kind = graph_kind(self.policy, self.env, self.want_logits)
        if kind is None:
            return None
        graphs = state["graphs"].get(self.cache_len)
        if graphs is not None:
            return graphs
        if kind == "all-gpu":
            if state["weights"] is None:
                state["weights"] = fuse_qkv_weights(self.lm.weight_home, self.env.gpu.dev)
            graphs = GraphedDecode(state["weights"])
        else:
            if state["slots"] is None:   # False once the weights cannot stream into slots
                state["slots"] = WeightSlots.create(self.lm.weight_home, self.env.gpu.dev) or False
            if not state["slots"]:
                return None
            graphs = StreamedGraphs(state["slots"])
        state["graphs"][self.cache_len] = graphs
        return graphs

    def _viewable(self) -> bool:
        """Whether a shorter cache can be a view of a longer one: an uncompressed cache held on
        the GPU (a host cache is read whole, as one contiguous copy; a view's rows are strided)."""
        return self.policy.cache_gpu_percent >= 100 and not self.policy.compress_cache

    def new_cache_home(self, j: int, k: int, length: int | None = None) -> tuple:
        """The held homes of (j, k) (made at the held length), or views of their first cache_len
        positions."""
        if self.full_homes is None:  # a run that holds no homes between blocks
            return super().new_cache_home(j, k, length)
        full = self.full_homes.get((j, k))
        if full is None:
            full = self.full_homes[(j, k)] = super().new_cache_home(j, k, self.home_len)
        return full if self.home_len == self.cache_len else tuple(h.prefix(self.cache_len) for h in full)

    def decode_block(self) -> DecodeBlock:
        """What graph decode needs of this block, and nothing more."""
        return DecodeBlock(layers=self.layers, batch=self.B, prompt_len=self.prompt_len,
                           total_len=self.cache_len, device=self.env.gpu.dev,
                           pick=self.pick, step_inputs=self._graph_inputs,
                           cache_homes=self._cache_homes, record_ids=self.record_ids)

    def _graph_inputs(self, i: int, k: int):
        info = self.step_info(i, k)
        return self.load_hidden(i, 0, k), info.positions, info.mask

    def _cache_homes(self, k: int) -> dict[int, tuple]:
        return {j: self.cache_home[(j, k)] for j, layer in enumerate(self.layers) if layer.has_cache}


def generate_block(run: BlockSteps, strategy, graphed: GraphedPipeline | None) -> np.ndarray:
    """Algorithm 1: for each token, each layer, each GPU batch, the strategy's ordering of
    load_weight / load_cache / compute / store_cache (compute stores the cache and hidden state).
    With graphs, decode (tokens 1..) replays them instead, pipelined. Decode runs torch on
    run.decode_torch_threads intra-op threads where that is set (steps.decode_threads)."""
    with contextlib.ExitStack() as decoding:
        for i in range(run.gen_len):
            if i == 1:
                decoding.enter_context(torch_threads(run.decode_torch_threads))
            if graphed is not None and i > 0:
                graphed.decode(run, i)
                break
            t0 = run.start_token(i)
            for j in range(len(run.layers)):
                for k in run.live_batches:  # a GPU batch whose rows have all ended is skipped
                    strategy.step(run, i, j, k)
            if run.end_token(i, t0):
                break
        run.drain()
    return run.output_ids
