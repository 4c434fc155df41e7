"""The model as layers: InputEmbed, SelfAttention, MLP, TransformerLayer (both), OutputEmbed,
shared by the families (model/families.py says which norm, positions and MLP each uses).

OPT follows transformers' OPTForCausalLM (pre-layer-norm, ReLU, learned positions offset by 2,
output tied to the token embedding); the Llama family follows LlamaForCausalLM (RMSNorm, rotary
positions from the step's position ids, SwiGLU, grouped-query attention, Mistral's sliding window).
Weights arrive loaded on the compute device, plain or compressed; `linear` dequantizes compressed
weights (fused kernel where available). Decode over a resident cache (the CUDA-graph path) runs
in fewer kernels: one fused attention call with the query scale folded in, heads as views, and
OPT's ReLU fused into fc1's GEMM (small-batch decode on the GPU is bound by kernel count).
"""
from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import Future

import torch
import torch.nn.functional as F

from flexgen_repro import trace
from flexgen_repro.kernels import cpu_attention
from flexgen_repro.model import families, rope
from flexgen_repro.model.attention_math import (DECODE_GPU_BACKENDS, decode_attention, gpu_kernels,
                                                prefill_attention, to_heads, window_columns)
from flexgen_repro.model.base import CachePart, Deferred, Layer, StepInfo, WeightSpec
from flexgen_repro.devices.host_stage import Staged, to_host
from flexgen_repro.model.norms import layer_norm, rms_norm
from flexgen_repro.options import RuntimeOptions

MLP_CHUNK_TOKENS = 4096
DEFAULT_OPTIONS = RuntimeOptions()  # frozen: what `attend` uses where a caller passes none


def dense(w):
    """A loaded weight as a dense tensor (decompressing a CompressedTensor)."""
    if w is None or isinstance(w, torch.Tensor):
        return w
    if w.dtype in (torch.float16, torch.bfloat16):
        from flexgen_repro import kernels
        return kernels.dequantize(w)  # one fused kernel on the GPU, the reference elsewhere
    from flexgen_repro.compression import decompress
    return decompress(w)  # float32 runs: the reference, exactly (the GPU test failed with the kernel)


def linear(x: torch.Tensor, w, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b, with `w` plain or compressed (fused 4-bit kernel for 16-bit activations on
    the GPU; float32 runs dequantize exactly and use torch's matmul)."""
    if not isinstance(w, torch.Tensor):
        from flexgen_repro import kernels
        if kernels.available() and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            return kernels.dequant_linear(x, w, dense(b))
        w = dense(w)
    return F.linear(x, w, dense(b))


def norm(x: torch.Tensor, w: dict, key: str, config) -> torch.Tensor:
    """The family's norm with weights w["w_<key>"] (and w["b_<key>"] for LayerNorm)."""
    if families.family_of(config).norm == "rms_norm":
        return rms_norm(x, dense(w[f"w_{key}"]), config.rms_norm_eps)
    return layer_norm(x, dense(w[f"w_{key}"]), dense(w[f"b_{key}"]), config.layer_norm_eps)


class InputEmbed(Layer):
    def __init__(self, config):
        self.config = config

    def specs(self) -> list[WeightSpec]:
        return families.input_specs(self.config)

    def forward(self, ids, w, step, cache=None):
        # ids: (b, s) int64 -> (b, s, h); OPT adds its learned positions (offset by 2)
        x = F.embedding(ids, dense(w["w_token"]))
        if "w_pos" in w:
            x = x + F.embedding(step.positions + 2, dense(w["w_pos"]))
        return x


class SelfAttention(Layer):
    has_cache = True

    def __init__(self, config, index: int):
        self.config, self.index = config, index
        self.rotary = families.family_of(config).positions == "rotary"
        self.window = getattr(config, "sliding_window", None)
        self._inv_freq: dict = {}  # device -> (inv_freq, attention factor), made at first use

    def specs(self) -> list[WeightSpec]:
        return families.attention_specs(self.config, self.index)

    def forward(self, x, w, step: StepInfo, cache: list[CachePart] | None = None):
        """x: (b, s, h) -> (out (b, s, h), (k, v) each (b, kv_heads, s, d) for the cache: in host
        memory where decode attended every row there)."""
        c = self.config
        hn = norm(x, w, "ln_attn", c)
        if (not step.is_prefill and cache is not None and len(cache) == 1 and cache[0].resident
                and isinstance(cache[0].k, torch.Tensor) and step.attn_sparsity == 1.0):
            return self._resident_decode(x, hn, w, step, cache[0])
        scale = c.head_dim ** -0.5
        q = linear(hn, w["w_q"], w.get("b_q"))
        k = to_heads(linear(hn, w["w_k"], w.get("b_k")), c.n_kv_head)
        v = to_heads(linear(hn, w["w_v"], w.get("b_v")), c.n_kv_head)
        if self.rotary:
            cos, sin = self._cos_sin(step.positions, x.dtype)
            q, k = rope.rotate(to_heads(q, c.n_head), cos, sin) * scale, rope.rotate(k, cos, sin)
        else:
            q = to_heads(q * scale, c.n_head)
        kv = (k, v)
        if step.is_prefill:
            attn = prefill_attention(q, k, v, step.mask, self.window,
                                     step.prefill_allowed(self.window))
        else:
            attn, staged = self._decode(q, k, v, self._windowed(step), cache)
            kv = staged or kv            # the host's copies, where CPU attention made them
            if isinstance(attn, Deferred):  # CPU attention running on step.cpu_pool
                return Deferred(lambda: (linear(attn.result(), w["w_out"], w.get("b_out")) + x, kv))
        out = linear(attn, w["w_out"], w.get("b_out")) + x
        return out, kv

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        dev = positions.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope.inverse_frequencies(self.config, dev)
        inv_freq, attention = self._inv_freq[dev]
        return rope.cos_sin(self.config, positions, inv_freq, attention, dtype)

    def _windowed(self, step: StepInfo) -> StepInfo:
        """A decode step's masks with the columns before the sliding window masked."""
        if self.window is None or step.mask.shape[1] <= self.window:
            return step
        length = step.mask.shape[1]
        keep = {name: getattr(step, name) & window_columns(length, length - 1, self.window,
                                                            getattr(step, name).device)
                for name in ("mask", "host_mask") if getattr(step, name) is not None}
        return dataclasses.replace(step, **keep)

    def _qkv_heads(self, hn, w, b: int, s: int):
        """q (b, heads, s, d), k, v (b, kv_heads, s, d) as views of the projections (one GEMM
        where GraphedDecode fused them at capture)."""
        c = self.config
        widths = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim)
        if "w_qkv" in w:
            qkv = linear(hn, w["w_qkv"], w.get("b_qkv"))
            parts = qkv.split(widths, dim=-1)
        else:
            parts = [linear(hn, w[f"w_{n}"], w.get(f"b_{n}")) for n in "qkv"]
        heads = (c.n_head, c.n_kv_head, c.n_kv_head)
        return [t.view(b, s, n, c.head_dim).transpose(1, 2) for t, n in zip(parts, heads)]

    def _resident_decode(self, x, hn, w, step: StepInfo, part: CachePart):
        """One new token per row over the whole home buffer (b, kv_heads, max_len, d), written in
        place at `part.write_index`; unwritten positions are masked by `step.mask` (b, max_len).
        Same maths as the general path; softmax stays in float32 inside the fused kernel."""
        c = self.config
        b, s, _ = hn.shape
        q, k, v = self._qkv_heads(hn, w, b, s)
        if self.rotary:
            cos, sin = self._cos_sin(step.positions, x.dtype)
            q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        _write_at(part.k, k, part.write_index)
        _write_at(part.v, v, part.write_index)
        attn = _fused_decode(q, part.k, part.v, self._resident_mask(step.mask, part.write_index),
                             c.head_dim ** -0.5)
        out = linear(attn, w["w_out"], w.get("b_out")) + x
        return out, (k, v)

    def _resident_mask(self, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The full-length mask of a resident cache, windowed around the new token at `index`."""
        if self.window is None:
            return mask
        return mask & window_columns(mask.shape[1], index, self.window, mask.device)[None]

    def _decode(self, q, k_new, v_new, step: StepInfo, cache: list[CachePart]) -> tuple:
        """(attention of the new token over each cache part, on the device that part is computed;
        with `step.cpu_pool`, parts on the CPU are attended there and the result is Deferred;
        where every part is an uncompressed cache attended on the CPU, the new keys and values as
        copied there for it, else None). The cache store writes those host copies as they are: it
        then neither copies from the GPU again nor waits for it."""
        outs, staged = [], []
        for part in cache:
            rows, dev = slice(part.start, part.stop), part.device
            if part.resident:  # the home buffer itself: write the new token, attend in place
                _write_at(part.k, k_new[rows], part.write_index)
                _write_at(part.v, v_new[rows], part.write_index)
                out = attend(q[rows], part.k, part.v,
                             self._resident_mask(step.mask[rows], part.write_index))
            elif part.in_place and step.attn_sparsity == 1.0:
                out = _attend_in_place(q[rows], k_new[rows], v_new[rows], part, step.mask[rows])
            else:
                k, v = part.k, part.v
                on_host = dev.type == "cpu" and step.host_mask is not None
                mask = (step.host_mask if on_host else step.mask)[rows]
                if part.valid is not None and k.shape[2] > part.valid:  # unwritten tail: masked
                    tail = torch.zeros(mask.shape[0], k.shape[2] - part.valid, dtype=torch.bool,
                                       device=mask.device)
                    mask = torch.cat([mask[:, :part.valid], tail, mask[:, part.valid:]], dim=1)
                if dev.type == "cpu" and step.cpu_pool is not None and step.host_stage is not None:
                    slot = step.host_stage.take(q[rows].shape, q.dtype)
                    with trace.span("to_cpu"):
                        slot.stage(q[rows], k_new[rows], v_new[rows])
                    if isinstance(k, torch.Tensor):   # a compressed home quantizes on the GPU
                        staged.append((slot.k_new, slot.v_new))
                    job = functools.partial(_staged_attend, slot, k, v, mask.to(dev), step.attn_sparsity,
                                            part.valid, step.options)
                    slot.future = step.cpu_pool.submit(job)
                    outs.append(Staged(slot))
                    continue
                with trace.span(f"to_{dev.type}"):
                    moved = (to_host(q[rows], k_new[rows], v_new[rows]) if dev.type == "cpu" else
                             (q[rows].to(dev), k_new[rows].to(dev), v_new[rows].to(dev)))
                    args = (*moved, mask.to(dev))
                if dev.type == "cpu" and isinstance(k, torch.Tensor):
                    staged.append(args[1:3])
                job = functools.partial(_traced_attend, f"attention_{dev.type}", args[0], k, v,
                                        args[3], step.attn_sparsity, args[1], args[2], part.valid,
                                        options=step.options)
                if dev.type == "cpu" and step.cpu_pool is not None:
                    outs.append(step.cpu_pool.submit(job))
                    continue
                out = job()
            outs.append(out.to(q.device))
        host_kv = None
        if len(staged) == len(cache):   # parts in row order, covering every row
            host_kv = tuple(parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*staged))
        if any(isinstance(o, (Future, Staged)) for o in outs):
            return Deferred(lambda: _gather(outs, q.device)), host_kv
        return _gather(outs, q.device), host_kv


def _attend_in_place(q, k_new, v_new, part: CachePart, mask: torch.Tensor) -> torch.Tensor:
    """Decode attention over a plain buffer with room: the new token written at `part.valid`,
    one fused call over the whole buffer with the positions after it masked (the resident path's
    kernel). q (b, heads, 1, d) pre-scaled, mask (b, valid + 1): the step's mask, new token last.
    Returns (b, 1, heads * d)."""
    k, v, at = part.k, part.v, part.valid
    k[:, :, at:at + 1].copy_(k_new)
    v[:, :, at:at + 1].copy_(v_new)
    full = torch.zeros(mask.shape[0], k.shape[2], dtype=torch.bool, device=mask.device)
    full[:, :at + 1] = mask
    return _fused_decode(q, k, v, full, 1.0)


def _fused_decode(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per row in one fused attention call: q (b, heads, 1, d) as (b, kv_heads,
    group, d) over k, v (b, kv_heads, L, d) with mask (b, L); softmax in float32 inside the
    kernel. Returns (b, 1, heads * d)."""
    b, heads, _, d = q.shape
    with gpu_kernels(q, DECODE_GPU_BACKENDS):
        out = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], heads // k.shape[1], d), k, v,
                                             attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(b, 1, heads * d)


def _traced_attend(name: str, *args, **kwargs) -> torch.Tensor:
    with trace.span(name):
        return attend(*args, **kwargs)


def _staged_attend(slot, k, v, mask, sparsity, valid, options=None) -> None:
    """On the worker: wait for the slot's inputs to reach the host, attend into its output."""
    with trace.span("attention_cpu"):
        slot.wait_ready()
        attend(slot.q, k, v, mask, sparsity, slot.k_new, slot.v_new, valid, out=slot.out,
               options=options)


def _gather(outs: list, device: torch.device) -> torch.Tensor:
    """Each part's output (a tensor or a Future of one) on `device`, rows in order."""
    outs = [o.result(device) if isinstance(o, Staged) else
            o.result().to(device) if isinstance(o, Future) else o for o in outs]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def attend(q, k, v, mask, sparsity=1.0, k_new=None, v_new=None, n_prev=None,
           out: torch.Tensor | None = None, options: RuntimeOptions | None = None) -> torch.Tensor:
    """decode_attention over a plain or compressed cache (k, v whole or leading positions).
    A compressed cache at 16 bits attended densely goes to kernels.compressed_heads_decode_attention
    (on the GPU a fused kernel that reads the packed bytes once, elsewhere its float32 reference);
    otherwise (float32 runs, sparse attention) it is decompressed first. A plain cache on the CPU
    attended densely goes to kernels.cpu_attention when its C kernel could be built. k and v
    may have fewer heads than q (grouped-query attention).
    `out` (b, 1, heads * d), optional: the result is written there (and returned). `options`: the
    C kernel's switch and team size (RuntimeOptions; None: the defaults)."""
    options = options or DEFAULT_OPTIONS
    if (sparsity == 1.0 and isinstance(k, torch.Tensor)
            and cpu_attention.supports(q, k, v, options.cpu_attention_kernel)):
        return cpu_attention.decode_attention(q, k, v, mask, k_new, v_new,
                                              n_prev if k_new is not None else None, out=out,
                                              threads=options.cpu_attention_threads)
    result = _attend_torch(q, k, v, mask, sparsity, k_new, v_new, n_prev)
    return result if out is None else out.copy_(result)


def _attend_torch(q, k, v, mask, sparsity, k_new, v_new, n_prev) -> torch.Tensor:
    if (not isinstance(k, torch.Tensor) and sparsity == 1.0 and k.shape[1] == q.shape[1]
            and q.dtype in (torch.float16, torch.bfloat16)):  # grouped-query: decompressed below
        from flexgen_repro import kernels
        return kernels.compressed_heads_decode_attention(q, k, v, mask, k_new, v_new)
    return decode_attention(q, dense(k), dense(v), mask, sparsity, k_new, v_new, n_prev)


def _write_at(home, value: torch.Tensor, index: torch.Tensor) -> None:
    """Write one token (b, heads, 1, d) into a (b, heads, max_len, d) buffer at position `index`
    (a 1-element device tensor, so a captured CUDA graph can replay it at any position)."""
    if isinstance(home, torch.Tensor):
        home.index_copy_(2, index, value)
        return
    from flexgen_repro import kernels
    packed = kernels.quantize(value, home.config)
    for name, comp in packed.components().items():
        home.components()[name].index_copy_(2, index, comp)


class MLP(Layer):
    def __init__(self, config, index: int):
        self.config, self.index = config, index
        self.swiglu = families.family_of(config).mlp == "swiglu"

    def specs(self) -> list[WeightSpec]:
        return families.mlp_specs(self.config, self.index)

    def forward(self, x, w, step, cache=None):
        """x: (b, s, h). Long prompts go through in chunks of about MLP_CHUNK_TOKENS tokens so the
        (tokens, ffn) intermediate stays bounded (it is the largest transient of a prefill)."""
        chunk = max(1, MLP_CHUNK_TOKENS // x.shape[0])
        if x.shape[1] <= chunk:
            return self._mlp(x, w)
        return torch.cat([self._mlp(x[:, i:i + chunk], w) for i in range(0, x.shape[1], chunk)], dim=1)

    def _mlp(self, x, w):
        hn = norm(x, w, "ln_mlp", self.config)
        if self.swiglu:  # down(silu(gate(x)) * up(x))
            gated = F.silu(linear(hn, w["w_gate"], None)) * linear(hn, w["w_up"], None)
            return linear(gated, w["w_down"], None) + x
        return linear(_linear_relu(hn, w["w_fc1"], w["b_fc1"]), w["w_fc2"], w["b_fc2"]) + x


def _linear_relu(x: torch.Tensor, w, b) -> torch.Tensor:
    """relu(x @ w.T + b); on the GPU with plain 16-bit weights one GEMM with a ReLU epilogue
    (torch._addmm_activation), saving a kernel per layer where decode is launch-bound."""
    if (x.is_cuda and isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
            and x.dtype in (torch.float16, torch.bfloat16) and hasattr(torch, "_addmm_activation")):
        flat = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t())
        return flat.view(*x.shape[:-1], w.shape[0])
    return torch.relu(linear(x, w, b))


class TransformerLayer(Layer):
    """Attention then MLP as one layer (sep_layer=False): one weight load covers both."""
    has_cache = True

    def __init__(self, config, index: int):
        self.attention, self.mlp = SelfAttention(config, index), MLP(config, index)

    def specs(self) -> list[WeightSpec]:
        return self.attention.specs() + self.mlp.specs()

    def forward(self, x, w, step, cache=None):
        attended = self.attention.forward(x, w, step, cache)
        if isinstance(attended, Deferred):
            return Deferred(lambda: self._mlp(attended.result(), w, step))
        return self._mlp(attended, w, step)

    def _mlp(self, attended, w, step):
        x, kv = attended
        return self.mlp.forward(x, w, step), kv


class OutputEmbed(Layer):
    def __init__(self, config):
        self.config = config

    def specs(self) -> list[WeightSpec]:
        return families.output_specs(self.config)

    def forward(self, x, w, step: StepInfo, cache=None):
        """(b, s, h) -> next ids (b,), or with `step.want_logits` the logits (b, s, vocab)."""
        if not step.want_logits:
            x = x[:, -1:]
        logits = linear(norm(x, w, "ln", self.config), w["w_token"], None)
        if step.want_logits:
            return logits
        return step.pick(logits[:, -1])


def build_layers(config, sep_layer: bool) -> list[Layer]:
    """The model in execution order (any family's config: OptConfig or LlamaConfig)."""
    families.family_of(config)  # an unsupported family fails here, naming the supported ones
    layers: list[Layer] = [InputEmbed(config)]
    for i in range(config.num_hidden_layers):
        if sep_layer:
            layers += [SelfAttention(config, i), MLP(config, i)]
        else:
            layers.append(TransformerLayer(config, i))
    layers.append(OutputEmbed(config))
    return layers
