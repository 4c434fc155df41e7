"""The original FlexGen as a baseline: `python -m flexgen_repro.bench.original`, one case per process.

It runs the published package (`flexgen` 0.1.8 on PyPI, the FlexLLMGen code) through its own
benchmark entry point, `flexgen.flex_opt.run_flexgen`, with dummy weights (`--path _DUMMY_`), so
its figures can sit beside ours from the same machine in the same call instead of beside numbers
measured on another day. Nothing of the original is copied here; this module only drives it:

- its command line is built from our case (`original_argv`); `--percent` goes through verbatim,
  so the original's own placement rule applies (for OPT-30B `20 80` it keeps about 8% of the
  weights on the GPU); the record gives the placement it actually made (`weight_placement`);
- `run_flexgen` loads the OPT tokenizer from the Hugging Face hub, which the GPU machine cannot
  reach; a stand-in (`PromptIds`) returns the same shape of input: one short prompt left-padded
  with OPT's pad id to the prompt length, repeated for every sequence. With dummy weights the
  token ids change no shape and no work, so the timing is the original's;
- the GPU cap is `torch.cuda.set_per_process_memory_fraction`, as for the other baselines;
- the timings are the original's own (`timers("generate").costs`: the prefill, then one entry
  per decode step, after its one-token warm-up), turned into our record with the same formulas.

`flexgen` is not in requirements.lock (it pins nothing and pulls `pulp`); carry its wheel to the
GPU machine (`python3 -m pip download --no-deps flexgen==0.1.8 attrs` makes the wheels).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from types import SimpleNamespace

from flexgen_repro.bench import baselines
from flexgen_repro.config import OptConfig, get_opt_config
from flexgen_repro.flex_opt import str2bool
from flexgen_repro.metrics import GB

PACKAGE_VERSION = "0.1.8"
PAD_ID = 1
# A short prompt's ids: OPT's BOS then six word pieces. Any ids give the same shapes and work.
PROMPT_IDS = (2, 32826, 16, 5, 812, 343, 9)


class PromptIds:
    """Stands in for `AutoTokenizer` inside the original's benchmark: `from_pretrained` returns a
    tokenizer whose call left-pads PROMPT_IDS with PAD_ID to `max_length` for each prompt."""

    def __init__(self, padding_side: str = "left"):
        if padding_side != "left":
            raise ValueError(f"only left padding is modelled, got {padding_side!r}")

    @classmethod
    def from_pretrained(cls, name: str, padding_side: str = "left", **_) -> "PromptIds":
        return cls(padding_side)

    def __call__(self, prompts, padding: str = "max_length", max_length: int | None = None, **_):
        if padding != "max_length" or max_length is None:
            raise ValueError("the stand-in tokenizer pads to max_length only")
        if max_length < len(PROMPT_IDS):
            raise ValueError(f"prompt length {max_length} is shorter than the {len(PROMPT_IDS)}-token prompt")
        row = [PAD_ID] * (max_length - len(PROMPT_IDS)) + list(PROMPT_IDS)
        return SimpleNamespace(input_ids=[list(row) for _ in prompts])

    def batch_decode(self, ids, **_):
        return [" ".join(str(int(t)) for t in row) for row in ids]


def hub_name(config: OptConfig) -> str:
    """The model name the original's `get_opt_config` takes ("facebook/opt-30b")."""
    return f"facebook/{config.name}"


def original_argv(args, log_file: str) -> list[str]:
    """The original's `flex_opt` command line for our case."""
    config = get_opt_config(args.model)
    yes = lambda on: "true" if on else "false"  # noqa: E731
    argv = ["--model", hub_name(config), "--path", "_DUMMY_", "--offload-dir", args.offload_dir,
            "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
            "--gpu-batch-size", str(args.gpu_batch_size),
            "--num-gpu-batches", str(args.num_gpu_batches),
            "--percent", *[str(p) for p in args.percent],
            "--overlap", yes(args.overlap), "--sep-layer", yes(args.sep_layer),
            "--pin-weight", yes(args.pin_weight), "--log-file", log_file, "--verbose", "1"]
    argv += [flag for flag, on in (("--cpu-cache-compute", args.cpu_cache_compute),
                                   ("--compress-weight", args.compress_weight),
                                   ("--compress-cache", args.compress_cache)) if on]
    return argv


def split_costs(costs: list[float], gen_len: int) -> tuple[float, float]:
    """(prefill s, decode s) from the original's per-step timer: the first entry is the prefill,
    the rest are the decode steps; a full run has gen_len entries."""
    if len(costs) != gen_len:
        raise ValueError(f"the original timed {len(costs)} steps for {gen_len} generated tokens "
                         f"(a projected or cut run?)")
    return costs[0], sum(costs[1:])


def _name(tensor) -> str:
    kind = getattr(getattr(tensor, "device", None), "device_type", None)
    return getattr(kind, "name", str(kind)).lower()


def tensor_share(tensor) -> tuple[str, int]:
    """(tier, stored bytes) of one of the original's TorchTensors; a compressed tensor counts its
    packed data and scales, on the tier of the packed data."""
    name = _name(tensor)
    if name == "compressed":
        data, scale = tensor.data[0], tensor.data[1]
        return tensor_share(data)[0], int(data.bytes) + int(scale.bytes)
    tier = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "disk": "disk"}.get(name)
    if tier is None:
        raise ValueError(f"unexpected device type {name!r} in the original's weights")
    return tier, int(tensor.bytes)


def _tensors(home):
    """The TorchTensors under a weight home (ValueHolders nest for a merged layer)."""
    for item in home.val:
        if hasattr(item, "val"):
            yield from _tensors(item)
        else:
            yield item


def weight_placement(model) -> dict[str, float]:
    """Percent of the weight bytes the original put on each tier (from its `weight_home`)."""
    totals = {"gpu": 0, "cpu": 0, "disk": 0}
    for home in model.weight_home:
        for tensor in _tensors(home):
            tier, nbytes = tensor_share(tensor)
            totals[tier] += nbytes
    whole = sum(totals.values()) or 1
    return {t: 100 * b / whole for t, b in totals.items()}


@contextlib.contextmanager
def recording_models(fo, built: list):
    """Within: the original's flex_opt module builds its OptLM as a subclass that appends each
    model to `built` (to read its placement), and tokenizes with PromptIds (no hub access).
    Both names are restored on exit, also after a failure."""
    saved = fo.AutoTokenizer, fo.OptLM

    class Recorded(saved[1]):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    fo.AutoTokenizer, fo.OptLM = PromptIds, Recorded
    try:
        yield
    finally:
        fo.AutoTokenizer, fo.OptLM = saved


def run(args) -> dict:
    import torch

    import flexgen
    import flexgen.flex_opt as fo
    config = get_opt_config(args.model)
    if not torch.cuda.is_available():
        raise ValueError("the original FlexGen needs a CUDA GPU (it builds on cuda:0)")
    total = torch.cuda.get_device_properties(0).total_memory
    if args.gpu_mem_gb:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem_gb * GB / total))
    built: list = []
    offload = os.path.expanduser(args.offload_dir)
    os.makedirs(offload, exist_ok=True)
    with recording_models(fo, built), tempfile.TemporaryDirectory(prefix="original-flexgen-") as tmp:
        parser = argparse.ArgumentParser()
        fo.add_parser_arguments(parser)
        fo_args = parser.parse_args(original_argv(args, os.path.join(tmp, "original.log")))
        torch.cuda.reset_peak_memory_stats()
        fo.run_flexgen(fo_args)
        with open(os.path.join(tmp, "original.log")) as f:
            original_log = f.read()
    prefill_s, decode_s = split_costs(list(fo.timers("generate").costs), args.gen_len)
    placement = weight_placement(built[-1])
    cache, act = args.percent[2:4], args.percent[4:6]
    batch = args.gpu_batch_size * args.num_gpu_batches
    import transformers
    extra = dict(system="original-flexgen", gpu_batch_size=args.gpu_batch_size,
                 num_gpu_batches=args.num_gpu_batches, overlap=args.overlap,
                 sep_layer=args.sep_layer, pin_weight=args.pin_weight,
                 cpu_cache_compute=args.cpu_cache_compute, compress_weight=args.compress_weight,
                 compress_cache=args.compress_cache,
                 percent=" ".join(f"{v:.4g}" for v in (placement["gpu"], placement["cpu"],
                                                        *cache, *act)),
                 requested_percent=" ".join(str(p) for p in args.percent),
                 flexgen_version=getattr(flexgen, "__version__", PACKAGE_VERSION),
                 torch_version=torch.__version__, transformers_version=transformers.__version__,
                 gpu_mem_cap_gb=args.gpu_mem_gb, original_log=original_log,
                 timing="the original's timers('generate'): prefill = its first entry, decode = the rest")
    record = baselines.build_record(config, batch, args.prompt_len, args.gen_len, prefill_s,
                                    decode_s, placement, torch.cuda.max_memory_allocated() / GB,
                                    _rss_peak_gb(), torch.cuda.get_device_name(0), extra)
    return record


def _rss_peak_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def build_parser() -> argparse.ArgumentParser:
    p = baselines.build_parser(prog="python -m flexgen_repro.bench.original",
                               description="the original FlexGen (PyPI flexgen) on dummy weights")
    p.add_argument("--percent", nargs=6, type=int, required=True,
                   help="six integers, passed to the original verbatim")
    p.add_argument("--gpu-batch-size", type=int, required=True)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    for flag, default in (("--overlap", True), ("--sep-layer", True), ("--pin-weight", True)):
        p.add_argument(flag, type=str2bool, default=default, metavar="true|false")
    for flag in ("--cpu-cache-compute", "--compress-weight", "--compress-cache"):
        p.add_argument(flag, action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.batch_size = args.gpu_batch_size * args.num_gpu_batches
    return baselines.run_main(args, "flexgen",
                              f"the original FlexGen baseline needs the `flexgen` package "
                              f"(`python3 -m pip install flexgen=={PACKAGE_VERSION} attrs`; not in requirements.lock)",
                              run, "original-flexgen", expandable_segments=False)


if __name__ == "__main__":
    sys.exit(main())
