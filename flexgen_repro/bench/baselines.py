"""The HF Accelerate baseline: `python -m flexgen_repro.bench.baselines`, one case per process.

A model of the named preset (OPT, Llama, Mistral or Qwen2, as transformers' class of the same
family and shape) is built empty (accelerate's `init_empty_weights`), given a `device_map`
by `infer_auto_device_map` under the same GPU cap as our cases, filled with dummy weights where
the map puts them, dispatched (`dispatch_model`: layers off the GPU are moved in per forward), and
timed through `generate`: prefill = a one-token generation, decode = the rest of the full one.
It writes the same JSON record as flex_opt. accelerate is imported only when a run starts, so
this module (and the record it builds) is usable without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

from flexgen_repro.config import LlamaConfig, OptConfig, dtype_name, get_model_config
from flexgen_repro.metrics import GB, PeakMemory, RunMetrics, log_text, write_outputs

NO_SPLIT = ("OPTDecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
ModelConfig = OptConfig | LlamaConfig
# GPU memory left out of the weights' budget for the allocator's slack and per-layer workspace.
GPU_SLACK_BYTES = 1 * GB
POOL_VALUES = 1 << 22


def hf_opt_config(config: OptConfig):
    """A transformers OPTConfig of the same shape (pre-layer-norm, no projection, relu)."""
    from transformers import OPTConfig
    return OPTConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                     num_attention_heads=config.n_head, ffn_dim=config.ffn_embed_dim,
                     max_position_embeddings=config.max_seq_len, vocab_size=config.vocab_size,
                     word_embed_proj_dim=config.hidden_size, do_layer_norm_before=True,
                     activation_function="relu", pad_token_id=config.pad_token_id,
                     bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True)


def hf_llama_config(config: LlamaConfig):
    """A transformers LlamaConfig / MistralConfig / Qwen2Config (by `model_type`) of the same shape:
    heads, KV heads, head width, MLP width, rotary base and scaling, sliding window, tied output."""
    import transformers
    if config.model_type == "llama" and config.attention_bias != config.attention_out_bias:
        raise ValueError(f"{config.name}: transformers' Llama has biases on all four attention "
                         "projections or none; this config has them on some only")
    if config.model_type == "qwen2" and not config.attention_bias:
        raise ValueError(f"{config.name}: transformers' Qwen2 always has q/k/v biases")
    extra = {"llama": dict(attention_bias=config.attention_bias, mlp_bias=False),
             "mistral": dict(sliding_window=config.sliding_window),
             "qwen2": dict(use_sliding_window=False)}[config.model_type]
    scaling = config.rope_scaling
    if scaling is not None:
        if scaling.rope_type == "dynamic":  # our max_seq_len holds the stretched length
            raise ValueError(f"{config.name}: dynamic rope scaling has no fixed transformers config")
        extra["rope_scaling"] = {k: v for k, v in dataclasses.asdict(scaling).items() if v is not None}
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[config.model_type]
    eos = list(config.eos_token_ids)
    return cls(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
               num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
               head_dim=config.head_dim, intermediate_size=config.intermediate_size,
               max_position_embeddings=config.max_seq_len, vocab_size=config.vocab_size,
               rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, hidden_act="silu",
               tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id,
               bos_token_id=config.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos or None,
               attention_dropout=0.0, **extra)


def hf_config(config: ModelConfig):
    """The transformers config of the model's family, of the same shape."""
    return hf_opt_config(config) if config.family == "opt" else hf_llama_config(config)


def hf_model_class(config: ModelConfig):
    """transformers' *ForCausalLM class of the model's family."""
    import transformers
    if config.family == "opt":
        return transformers.OPTForCausalLM
    return {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
            "qwen2": transformers.Qwen2ForCausalLM}[config.model_type]


def mlp_width(config: ModelConfig) -> int:
    """Width of the MLP's widest live activation: OPT's fc1 output, or SwiGLU's gate and up
    projections side by side."""
    return config.ffn_embed_dim if config.family == "opt" else 2 * config.intermediate_size


def weight_budget(config: ModelConfig, batch: int, prompt_len: int, gen_len: int,
                  gpu_mem_gb: float | None, gpu_total_bytes: int) -> int:
    """GPU bytes the device_map may give to weights: the cap less the KV cache, the largest
    activations of a prefill (the MLP's and the attention scores') and GPU_SLACK_BYTES."""
    cap = min(gpu_total_bytes, int(gpu_mem_gb * GB)) if gpu_mem_gb else gpu_total_bytes
    seq = prompt_len + gen_len
    work = max(config.hidden_bytes(batch, prompt_len) * mlp_width(config) // config.hidden_size,
               batch * config.n_head * prompt_len * prompt_len * config.dtype_bytes)
    left = cap - config.cache_bytes(batch, seq) - 2 * work - GPU_SLACK_BYTES
    if left <= 0:
        raise ValueError(f"a {cap / GB:.1f} GiB GPU cap leaves nothing for {config.name}'s weights "
                         f"at batch {batch}: lower the batch or raise --gpu-mem-gb")
    return left


def tier_of(device) -> str:
    """device_map value -> tier name: GPU indices and "cuda..." are "gpu"; "cpu"; "disk"."""
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "gpu"
    if str(device) in ("cpu", "disk"):
        return str(device)
    raise ValueError(f"unexpected device_map value {device!r}")


def device_of(name: str, device_map: dict) -> object:
    """The device_map entry covering parameter `name` (the longest matching module prefix)."""
    best = None
    for prefix in device_map:
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise ValueError(f"device_map has no entry covering {name!r}")
    return device_map[best]


def placement_percent(param_bytes: dict[str, int], device_map: dict) -> dict[str, float]:
    """Percent of weight bytes per tier under a device_map ({"gpu", "cpu", "disk"} -> %)."""
    totals = {"gpu": 0, "cpu": 0, "disk": 0}
    for name, nbytes in param_bytes.items():
        totals[tier_of(device_of(name, device_map))] += nbytes
    whole = sum(totals.values())
    return {t: 100 * b / whole for t, b in totals.items()}


def build_record(config: ModelConfig, batch: int, prompt_len: int, gen_len: int, prefill_s: float,
                 decode_s: float, placement: dict[str, float], peak_gpu_gb: float,
                 peak_cpu_gb: float, device: str, extra: dict | None = None) -> dict:
    """The flex_opt-format record of a baseline run (the cache and activations live on the GPU)."""
    m = RunMetrics(batch, prompt_len, gen_len, prefill_s, decode_s, peak_gpu_gb, peak_cpu_gb)
    seq = prompt_len + gen_len
    sizes = (config.model_bytes(), config.cache_bytes(batch, seq), config.hidden_bytes(batch, seq))
    percent = (placement["gpu"], placement["cpu"], 100, 0, 100, 0)
    record = dict(model=config.name, system="hf-accelerate", path="_DUMMY_",
                  percent=" ".join(f"{v:.4g}" for v in percent), gpu_batch_size=batch,
                  num_gpu_batches=1, compress_weight=False, compress_cache=False,
                  cpu_cache_compute=False, overlap=False, sep_layer=False, pin_weight=False,
                  attn_sparsity=1.0, dtype=dtype_name(config.dtype), model_size_gb=sizes[0] / GB,
                  cache_size_gb=sizes[1] / GB, hidden_size_gb=sizes[2] / GB,
                  weight_placement=placement, device=device, measured=True,
                  python_version=platform.python_version(), log_text=log_text(m, *sizes),
                  **m.as_dict())
    record.update(extra or {})
    return record


def _fill_dummy(model, device_map: dict, main_device: str) -> None:
    """Materialize every (meta) parameter where the map puts it, from a fixed random pool."""
    import torch
    from accelerate.utils import set_module_tensor_to_device
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(POOL_VALUES, generator=gen) * 0.02).half()
    for name, p in list(model.named_parameters()):
        tier = tier_of(device_of(name, device_map))
        value = torch.empty(p.shape, dtype=torch.float16)
        flat, done = value.view(-1), 0
        while done < flat.numel():
            n = min(POOL_VALUES, flat.numel() - done)
            flat[done:done + n] = pool[:n]
            done += n
        set_module_tensor_to_device(model, name, main_device if tier == "gpu" else "cpu", value=value)
    model.tie_weights()


def empty_model(config: ModelConfig):
    """The model on the meta device (no memory), fp16, tied where its family ties, in eval mode."""
    import torch
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = hf_model_class(config)(hf_config(config)).to(torch.float16).eval()
    model.tie_weights()
    return model


def gpu_device_map(model, config: ModelConfig, batch: int, prompt_len: int, gen_len: int,
                   gpu_mem_gb: float | None) -> dict:
    """accelerate's device_map under the GPU cap (weights budget from weight_budget), host memory
    for the rest while it lasts, then disk."""
    import psutil
    import torch
    from accelerate import infer_auto_device_map
    total = torch.cuda.get_device_properties(0).total_memory
    if gpu_mem_gb:
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_mem_gb * GB / total))
    budget = weight_budget(config, batch, prompt_len, gen_len, gpu_mem_gb, total)
    max_memory = {0: budget, "cpu": int(psutil.virtual_memory().available * 0.9)}
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=list(NO_SPLIT), dtype=torch.float16)
    sizes = {n: p.numel() * 2 for n, p in model.named_parameters()}
    return fit_gpu_share(sizes, device_map, budget)


def fit_gpu_share(sizes: dict, device_map: dict, budget: int) -> dict:
    """device_map with its last GPU entries moved to the CPU until the GPU holds at most `budget`
    bytes of weights. accelerate's map overshot its budget for OPT-30B at batch 8 (12.9 GiB of
    weights on the GPU against about 10; the load ran out of the 16 GiB cap)."""
    out = dict(device_map)
    on_gpu = lambda: sum(n for k, n in sizes.items() if tier_of(device_of(k, out)) == "gpu")  # noqa: E731
    for key in reversed(list(out)):
        if on_gpu() <= budget:
            break
        if tier_of(out[key]) == "gpu":
            out[key] = "cpu"
    return out


def dispatch_dummy(model, device_map: dict, main: str, offload_dir: str):
    """Fill dummy weights where `device_map` puts them and attach accelerate's offload hooks
    (disk-mapped layers are written under `offload_dir`, which must be a fresh folder)."""
    from accelerate import dispatch_model
    _fill_dummy(model, device_map, main)
    if len(set(device_map.values())) == 1 and "disk" not in device_map.values():
        return model
    return dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_dir)


def _generate(model, ids, new_tokens: int, main: str, pad_token_id: int = 1) -> float:
    import torch
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    if main != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(args) -> dict:
    import tempfile

    import torch
    config = get_model_config(args.model, dtype=args.dtype)
    model = empty_model(config)
    if torch.cuda.is_available():
        device_map, main = gpu_device_map(model, config, args.batch_size, args.prompt_len,
                                          args.gen_len, args.gpu_mem_gb), "cuda:0"
    else:  # no GPU: the "gpu" tier is host memory, as in our runtime
        device_map, main = {"": "cpu"}, "cpu"
    root = os.path.expanduser(args.offload_dir)
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf-accelerate-", dir=root) as offload:
        model = dispatch_dummy(model, device_map, main, offload)
        timings, peak = _measure(model, config, args, main)
    sizes = {n: p.numel() * 2 for n, p in model.named_parameters()}
    device = torch.cuda.get_device_name(0) if main != "cpu" else \
        f"cpu ({platform.processor() or platform.machine()})"
    import accelerate
    import transformers
    extra = dict(torch_version=torch.__version__, accelerate_version=accelerate.__version__,
                 transformers_version=transformers.__version__, gpu_mem_cap_gb=args.gpu_mem_gb,
                 device_map={k: str(v) for k, v in device_map.items()},
                 gpu_weight_gb=sum(n for k, n in sizes.items()
                                   if tier_of(device_of(k, device_map)) == "gpu") / GB,
                 timing="prefill = generate(1 token); decode = generate(gen_len) - prefill")
    return build_record(config, args.batch_size, args.prompt_len, args.gen_len, *timings,
                        placement_percent(sizes, device_map), peak.gpu_peak_bytes / GB,
                        peak.cpu_peak_bytes / GB, device, extra)


def _measure(model, config: ModelConfig, args, main: str) -> tuple[tuple[float, float], PeakMemory]:
    """((prefill s, decode s), peak memory) of one warm-up and two timed generations."""
    import torch
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, min(config.vocab_size, 50000), (args.batch_size, args.prompt_len),
                        generator=gen).to(main)
    pad = config.pad_token_id
    _generate(model, ids[:, : min(8, args.prompt_len)], 1, main, pad)  # warm-up
    with PeakMemory() as peak:
        prefill_s = _generate(model, ids, 1, main, pad)
        total_s = _generate(model, ids, args.gen_len, main, pad)
    return (prefill_s, max(total_s - prefill_s, 1e-9)), peak


def build_parser(prog: str = "python -m flexgen_repro.bench.baselines",
                 description: str = "HF Accelerate device_map offload baseline (dummy weights)"
                 ) -> argparse.ArgumentParser:
    """The baselines' shared command line (zero_inference adds its own switches)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gpu-mem-gb", type=float, default=None)
    p.add_argument("--offload-dir", default="~/flexllmgen_offload_dir")
    p.add_argument("--dtype", choices=["float16"], default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-file", default=None)
    p.add_argument("--log-file", default=None)
    return p


def run_main(args, package: str, missing: str, run_case, label: str,
             expandable_segments: bool = True) -> int:
    """Import `package` (else print `missing`, exit 2), run the case, print and write its record;
    bad input (ValueError) exits 2 with its message."""
    if expandable_segments:
        # before CUDA starts: loading layer by layer under a cap fragmented the default allocator
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        __import__(package)
    except ImportError:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        record = run_case(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(record["log_text"])
    write_outputs(record, f"{label} {record['model']} batch {record['gpu_batch_size']}",
                  args.log_file, args.json_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser().parse_args(argv), "accelerate",
                    "the HF Accelerate baseline needs `accelerate` (pip install accelerate); "
                    "it is not in requirements.lock", run, "hf-accelerate")


if __name__ == "__main__":
    sys.exit(main())
