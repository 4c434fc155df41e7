"""The DeepSpeed ZeRO-Inference baseline: `python -m flexgen_repro.bench.zero_inference`, one case
per process.

ZeRO stage 3 keeps every weight in pinned host memory and gathers each layer onto the GPU for its
forward pass, prefetching the next; with `--quant-bits 4` the weights are held 4-bit, group-wise
(DeepSpeed's `weight_quantization.quantized_initialization`: groups of 64 along dim 1, asymmetric).
The model (transformers' class of its family, `baselines.hf_model_class`) is built inside
`deepspeed.zero.Init`, so each module's dummy weights (torch's default init, run on the GPU) are
partitioned to the host as soon as it exists and the model is never whole on the GPU;
transformers' own init pass, which would gather every layer again, is skipped.
It is then timed through `generate` exactly as the HF Accelerate baseline (`baselines._measure`).

Not attempted: ZeRO-Inference's KV-cache offload, which needs DeepSpeedExamples' patched model
classes; the cache stays on the GPU, so the batch is bounded by the GPU cap as for Accelerate.
DeepSpeed is not in requirements.lock (it ships only a source archive; its CUDA ops build on first
use): `DS_BUILD_OPS=0 python3 -m pip install deepspeed==0.19.8` installs it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from flexgen_repro.bench import baselines
from flexgen_repro.config import get_model_config
from flexgen_repro.metrics import GB

GROUP_SIZE = 64


def ds_config(config: baselines.ModelConfig, batch: int, quant_bits: int = 0,
              pin: bool = True) -> dict:
    """ZeRO-3 inference config: parameters offloaded to (pinned) host memory, prefetch and live
    parameters bounded to two hidden x hidden blocks, small tensors kept on the GPU."""
    if quant_bits not in (0, 4, 8):
        raise ValueError(f"--quant-bits must be 0 (fp16), 4 or 8, got {quant_bits}")
    if quant_bits and config.hidden_size % GROUP_SIZE:
        raise ValueError(f"{config.name}'s hidden size {config.hidden_size} is not a multiple of "
                         f"the quantization group {GROUP_SIZE}: use --quant-bits 0")
    h = config.hidden_size
    out = {"fp16": {"enabled": True}, "bf16": {"enabled": False},
           "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2 * h * h,
                                 "stage3_param_persistence_threshold": h,
                                 "stage3_max_live_parameters": 2 * h * h,
                                 "offload_param": {"device": "cpu", "pin_memory": pin}},
           "train_batch_size": batch, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    if quant_bits:
        out["weight_quantization"] = {"quantized_initialization": {
            "num_bits": quant_bits, "group_size": GROUP_SIZE, "group_dim": 1, "symmetric": False}}
    return out


@contextlib.contextmanager
def _no_transformers_init():
    """transformers' weight init pass off (restored on exit): under ZeRO-3 it gathers each layer."""
    from transformers import PreTrainedModel
    saved = PreTrainedModel._init_weights
    PreTrainedModel._init_weights = lambda self, module: None
    try:
        yield
    finally:
        PreTrainedModel._init_weights = saved


def sane_arch_list(value: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST without arch-specific suffixes ("9.0a" -> "9.0"): DeepSpeed's JIT op
    builder (the 4-bit quantizer) parses each entry as int.int[+PTX] and fails on "0a"."""
    if not value:
        return value
    out = []
    for item in value.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        base = item[:-4] if ptx else item
        major, _, minor = base.partition(".")
        minor = minor.rstrip("abcdefghijklmnopqrstuvwxyz")
        entry = f"{major}.{minor or 0}{'+PTX' if ptx else ''}"
        if entry not in out:
            out.append(entry)
    return ";".join(out)


def build_engine(config: baselines.ModelConfig, ds: dict):
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = sane_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    import deepspeed
    import torch
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed()
    pin = ds["zero_optimization"]["offload_param"]["pin_memory"]
    with _no_transformers_init(), deepspeed.zero.Init(config_dict_or_path=ds, remote_device="cpu",
                                                      pin_memory=pin, dtype=torch.float16):
        model = baselines.hf_model_class(config)(baselines.hf_config(config))
    engine = deepspeed.initialize(model=model, config_params=ds)[0]
    engine.module.eval()
    return engine.module


def run(args) -> dict:
    import deepspeed
    import torch
    import transformers
    if not torch.cuda.is_available():
        raise ValueError("ZeRO-Inference needs a CUDA GPU")
    config = get_model_config(args.model, dtype=args.dtype)
    total = torch.cuda.get_device_properties(0).total_memory
    if args.gpu_mem_gb:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem_gb * GB / total))
    ds = ds_config(config, args.batch_size, args.quant_bits, pin=not args.no_pin)
    model = build_engine(config, ds)
    timings, peak = baselines._measure(model, config, args, "cuda:0")
    extra = dict(system="deepspeed-zero-inference", torch_version=torch.__version__,
                 deepspeed_version=deepspeed.__version__, transformers_version=transformers.__version__,
                 gpu_mem_cap_gb=args.gpu_mem_gb, compress_weight=bool(args.quant_bits),
                 quant_bits=args.quant_bits, pin_weight=not args.no_pin, ds_config=ds,
                 timing="prefill = generate(1 token); decode = generate(gen_len) - prefill")
    return baselines.build_record(config, args.batch_size, args.prompt_len, args.gen_len, *timings,
                                  {"gpu": 0.0, "cpu": 100.0, "disk": 0.0}, peak.gpu_peak_bytes / GB,
                                  peak.cpu_peak_bytes / GB, torch.cuda.get_device_name(0), extra)


def build_parser() -> argparse.ArgumentParser:
    p = baselines.build_parser("python -m flexgen_repro.bench.zero_inference",
                               "DeepSpeed ZeRO-Inference baseline (dummy weights)")
    p.add_argument("--quant-bits", type=int, default=0, help="0 (fp16 weights), 4 or 8")
    p.add_argument("--no-pin", action="store_true", help="offloaded weights in pageable memory")
    return p


def main(argv: list[str] | None = None) -> int:
    return baselines.run_main(build_parser().parse_args(argv), "deepspeed",
                              "the ZeRO-Inference baseline needs `deepspeed` (not in "
                              "requirements.lock; `DS_BUILD_OPS=0 python3 -m pip install "
                              "deepspeed==0.19.8` installs it)", run, "deepspeed zero-inference")


if __name__ == "__main__":
    sys.exit(main())
