"""`invoke policy` / `python -m flexgen_repro.cost_model.cli`: the best policy for a machine as
flex_opt flags, or (`--evaluate "FLAGS"`) the predicted throughput of a given policy.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from flexgen_repro.config import get_model_config
from flexgen_repro.cost_model.hardware import GIB, load_profile
from flexgen_repro.cost_model.predict import Prediction, evaluate_policy
from flexgen_repro.cost_model.search import DoesNotFit, best_policy
from flexgen_repro.policy import Policy, parse_percent


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"--evaluate: {message}")


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _flex_opt_parser() -> argparse.ArgumentParser:
    """The policy flags of flex_opt (same names and defaults); run-only flags are accepted and ignored."""
    p = _RaisingParser(prog="--evaluate", add_help=False)
    p.add_argument("--percent", nargs="+", default=["100", "0", "100", "0", "100", "0"])
    p.add_argument("--gpu-batch-size", type=int, default=4)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--cpu-cache-compute", "--cpu", dest="cpu_cache_compute", action="store_true")
    p.add_argument("--compress-weight", action="store_true")
    p.add_argument("--compress-cache", action="store_true")
    for flag in ("--pin-weight", "--sep-layer", "--overlap"):
        p.add_argument(flag, type=_bool, nargs="?", const=True, default=True)
    p.add_argument("--attn-sparsity", type=float, default=1.0)
    p.add_argument("--model")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--gen-len", type=int)
    for flag in ("--path", "--offload-dir", "--log-file", "--json-file", "--verbose", "--dtype",
                 "--gpu-mem-gb", "--hardware", "--seed"):
        p.add_argument(flag)
    p.add_argument("--no-warmup", action="store_true")
    return p


def parse_flags(text: str) -> tuple[Policy, argparse.Namespace]:
    """A Policy from flex_opt flags ("--percent 20 80 0 100 0 100 --gpu-batch-size 48 ...")."""
    args = _flex_opt_parser().parse_args(shlex.split(text))
    if any(v.lower() == "auto" for v in args.percent):
        raise ValueError("--evaluate needs six --percent numbers, not `auto`")
    pct = parse_percent(args.percent)
    policy = Policy(gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
                    w_gpu_percent=pct[0], w_cpu_percent=pct[1], cache_gpu_percent=pct[2],
                    cache_cpu_percent=pct[3], act_gpu_percent=pct[4], act_cpu_percent=pct[5],
                    overlap=args.overlap, sep_layer=args.sep_layer, pin_weight=args.pin_weight,
                    cpu_cache_compute=args.cpu_cache_compute, attn_sparsity=args.attn_sparsity,
                    compress_weight=args.compress_weight, compress_cache=args.compress_cache)
    return policy, args


def policy_flags(policy: Policy) -> str:
    """flex_opt flags for `policy` (defaults left out)."""
    out = ["--percent " + " ".join(f"{v:g}" for v in policy.percent),
           f"--gpu-batch-size {policy.gpu_batch_size}", f"--num-gpu-batches {policy.num_gpu_batches}"]
    out += [flag for flag, on in (("--cpu-cache-compute", policy.cpu_cache_compute),
                                  ("--compress-weight", policy.compress_weight),
                                  ("--compress-cache", policy.compress_cache)) if on]
    out += [f"{flag} 0" for flag, on in (("--pin-weight", policy.pin_weight),
                                         ("--sep-layer", policy.sep_layer),
                                         ("--overlap", policy.overlap)) if not on]
    return " ".join(out)


def result_json(policy: Policy, pred: Prediction, **context) -> dict:
    out = dict(percent=list(policy.percent), gpu_batch_size=policy.gpu_batch_size,
               num_gpu_batches=policy.num_gpu_batches, cpu_cache_compute=policy.cpu_cache_compute,
               compress_weight=policy.compress_weight, compress_cache=policy.compress_cache,
               predicted_throughput=pred.throughput, pin_weight=policy.pin_weight,
               overlap=policy.overlap, block_size=policy.block_size, flags=policy_flags(policy))
    out.update(pred.as_dict())
    out.update(context)
    return out


def _describe(policy: Policy, pred: Prediction, header: str) -> str:
    tiers = ", ".join(f"{t.upper() if t != 'disk' else t} {pred.peak_memory[t] / GIB:.1f} / "
                      f"{pred.capacity[t] / GIB:.1f} GiB" for t in pred.peak_memory)
    lines = [policy_flags(policy),
             f"predicted throughput: {pred.throughput:.3f} token/s ({header}, block {policy.block_size})",
             f"  prefill {pred.prefill_time:.2f} s (bound: {pred.prefill_bound}) + decode "
             f"{pred.decode_time:.2f} s = {pred.decode_step_time:.3f} s/token step (bound: "
             f"{pred.decode_bound}); decode throughput {pred.decode_throughput:.3f} token/s",
             f"  peak memory: {tiers}"]
    if pred.page_cache:
        lines.append("  disk tier held by the page cache (mapped files, read at its rate)")
    if not pred.feasible:
        lines.append(f"  does not fit: {', '.join(pred.over)} over its limit")
    return "\n".join(lines)


def main(model: str, hardware: str = "t4-paper", prompt_len: int = 512, gen_len: int = 32,
         compress: bool = False, evaluate: str | None = None, as_json: bool = False,
         gpu_mem_gb: float | None = None, cpu_mem_gb: float | None = None,
         disk_mem_gb: float | None = None) -> int:
    """Print the best policy (or the prediction of `evaluate`'s flags); 0 on success, 1 when
    nothing fits, 2 on bad input."""
    try:
        profile = load_profile(hardware).with_memory(gpu_mem_gb, cpu_mem_gb, disk_mem_gb)
        if evaluate is not None:
            policy, args = parse_flags(evaluate)
            model = args.model or model
            prompt_len, gen_len = args.prompt_len or prompt_len, args.gen_len or gen_len
        config = get_model_config(model)
        context = dict(model=config.name, hardware=profile.name, prompt_len=prompt_len, gen_len=gen_len)
        if evaluate is not None:
            pred = evaluate_policy(config, policy, profile, prompt_len, gen_len)
            extra = {}
        else:
            result = best_policy(config, profile, prompt_len, gen_len, compress=compress)
            policy, pred = result.policy, result.prediction
            extra = dict(relaxed_throughput=result.relaxed_throughput, lps_solved=result.lps_solved,
                         search_s=round(result.elapsed_s, 3))
    except DoesNotFit as e:
        print(json.dumps({"error": str(e), "tier": e.tier}) if as_json else f"error: {e}",
              file=sys.stdout if as_json else sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result_json(policy, pred, **context, **extra)))
    else:
        header = f"{config.name} on {profile.name}, prompt {prompt_len}, gen {gen_len}"
        print(_describe(policy, pred, header))
        if extra:
            print(f"  searched {extra['lps_solved']} LPs in {extra['search_s']:.2f} s; relaxed "
                  f"optimum {extra['relaxed_throughput']:.3f} token/s")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flexgen_repro.cost_model.cli", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--hardware", default="t4-paper", help="t4-paper, local, or a profile JSON file")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--compress", action="store_true", help="allow 4-bit weights and cache")
    p.add_argument("--evaluate", default=None, help='flex_opt flags in quotes, e.g. "--percent ..."')
    p.add_argument("--json", action="store_true")
    for tier in ("gpu", "cpu", "disk"):
        p.add_argument(f"--{tier}-mem-gb", type=float, default=None,
                       help=f"override the profile's usable {tier} memory (GiB)")
    return p


if __name__ == "__main__":
    a = _parser().parse_args()
    sys.exit(main(a.model, a.hardware, a.prompt_len, a.gen_len, a.compress, a.evaluate, a.json,
                  a.gpu_mem_gb, a.cpu_mem_gb, a.disk_mem_gb))
