"""The original-FlexGen baseline driver (bench/original.py): its command line for the original,
the stand-in tokenizer, the split of the original's timer, the placement read from the original's
weight homes, and the whole driver against a stand-in `flexgen.flex_opt` that has the original's
entry points (the real package needs CUDA and is not in the lock file; it runs on the GPU machine).
"""
from __future__ import annotations

import argparse
import enum
import sys
import types
from types import SimpleNamespace

import pytest

from flexgen_repro.bench import limits, original, runner, suites
from flexgen_repro.config import get_opt_config
from flexgen_repro.metrics import GB


def _args(**kw):
    argv = ["--model", "opt-30b", "--percent", "0", "100", "100", "0", "100", "0",
            "--gpu-batch-size", "8", "--gpu-mem-gb", "16", "--offload-dir", "/tmp/off"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *([] if v is True else [str(v)])]
    args = original.build_parser().parse_args(argv)
    args.batch_size = args.gpu_batch_size * args.num_gpu_batches
    return args


def _original_parser() -> argparse.ArgumentParser:
    """The original's flex_opt flags as its README documents them (names, types, defaults)."""
    p = argparse.ArgumentParser()
    to_bool = lambda s: s if isinstance(s, bool) else s.lower() in ("yes", "true", "t", "y", "1")  # noqa: E731
    for name, default in (("--model", None), ("--path", None), ("--offload-dir", None),
                          ("--log-file", "auto")):
        p.add_argument(name, default=default)
    for name in ("--prompt-len", "--gen-len", "--gpu-batch-size", "--num-gpu-batches", "--verbose",
                 "--cut-gen-len"):
        p.add_argument(name, type=int)
    p.add_argument("--percent", nargs="+", type=int)
    for name in ("--overlap", "--sep-layer", "--pin-weight"):
        p.add_argument(name, type=to_bool, nargs="?", const=True, default=True)
    for name in ("--cpu-cache-compute", "--compress-weight", "--compress-cache", "--no-log"):
        p.add_argument(name, action="store_true")
    p.add_argument("--attn-sparsity", type=float, default=1.0)
    p.add_argument("--debug-mode", default=None)
    return p


def test_argv_carries_the_case_to_the_original():
    args = _args(num_gpu_batches=3, pin_weight="false", cpu_cache_compute=True, compress_cache=True)
    ns = _original_parser().parse_args(original.original_argv(args, "/tmp/x.log"))
    assert ns.model == "facebook/opt-30b" and ns.path == "_DUMMY_" and ns.offload_dir == "/tmp/off"
    assert (ns.prompt_len, ns.gen_len, ns.gpu_batch_size, ns.num_gpu_batches) == (512, 32, 8, 3)
    assert ns.percent == [0, 100, 100, 0, 100, 0]
    assert (ns.overlap, ns.sep_layer, ns.pin_weight) == (True, True, False)
    assert ns.cpu_cache_compute and ns.compress_cache and not ns.compress_weight
    assert ns.log_file == "/tmp/x.log" and ns.cut_gen_len is None and ns.debug_mode is None  # full run


def test_stand_in_tokenizer_left_pads_every_prompt():
    tok = original.PromptIds.from_pretrained("facebook/opt-30b", padding_side="left")
    ids = tok(["Paris is the capital city of"] * 3, padding="max_length", max_length=32).input_ids
    assert len(ids) == 3 and all(len(row) == 32 for row in ids)
    assert ids[0][:25] == [original.PAD_ID] * 25 and tuple(ids[0][25:]) == original.PROMPT_IDS
    with pytest.raises(ValueError, match="shorter than the 7-token prompt"):
        tok(["x"], padding="max_length", max_length=4)
    with pytest.raises(ValueError, match="left padding"):
        original.PromptIds.from_pretrained("facebook/opt-30b", padding_side="right")


def test_split_costs_refuses_a_cut_run():
    assert original.split_costs([2.0, 1.0, 1.5], 3) == (2.0, 2.5)
    with pytest.raises(ValueError, match="timed 2 steps for 3 generated tokens"):
        original.split_costs([2.0, 1.0], 3)


class Kind(enum.Enum):  # the original's DeviceType names
    CPU = 1
    CUDA = 2
    DISK = 3
    MIXED = 4
    COMPRESSED = 5


def _tensor(kind: Kind, nbytes: int, data=None):
    return SimpleNamespace(device=SimpleNamespace(device_type=kind), bytes=nbytes, data=data)


def test_weight_placement_hand_worked():
    packed = (_tensor(Kind.CPU, 30), _tensor(Kind.CPU, 10), None)
    homes = [SimpleNamespace(val=[_tensor(Kind.CUDA, 40), _tensor(Kind.CPU, 10)]),
             # a merged layer nests two holders; a compressed weight counts its data and scales
             SimpleNamespace(val=(SimpleNamespace(val=[_tensor(Kind.DISK, 10)]),
                                  SimpleNamespace(val=[_tensor(Kind.COMPRESSED, 160, packed)])))]
    placement = original.weight_placement(SimpleNamespace(weight_home=homes))
    assert placement == {"gpu": 40.0, "cpu": 50.0, "disk": 10.0}
    with pytest.raises(ValueError, match="unexpected device type 'mixed'"):
        original.weight_placement(SimpleNamespace(weight_home=[SimpleNamespace(
            val=[_tensor(Kind.MIXED, 1)])]))


def _fake_flex_opt(costs, homes):
    """A stand-in `flexgen.flex_opt`: its entry points, driving the tokenizer and OptLM the driver
    installs the way the original's benchmark does."""
    mod = types.ModuleType("flexgen.flex_opt")
    timer = SimpleNamespace(costs=[])
    mod.timers = lambda name: timer
    mod.add_parser_arguments = lambda p: _copy_actions(_original_parser(), p)

    class OptLM:
        def __init__(self, config, env, path, policy):
            self.weight_home = homes

    def run_flexgen(args):
        tok = mod.AutoTokenizer.from_pretrained(args.model, padding_side="left")
        ids = tok(["Paris"], padding="max_length", max_length=args.prompt_len).input_ids
        assert len(ids[0]) == args.prompt_len
        mod.OptLM(None, None, args.path, None)
        timer.costs[:] = costs
        with open(args.log_file, "w") as f:
            f.write("total throughput: 1 token/s\n")

    mod.OptLM, mod.run_flexgen, mod.AutoTokenizer = OptLM, run_flexgen, None
    return mod


def _copy_actions(src: argparse.ArgumentParser, dst: argparse.ArgumentParser) -> None:
    for action in src._actions[1:]:
        kw = dict(default=action.default, dest=action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            dst.add_argument(*action.option_strings, action="store_true", dest=action.dest)
        else:
            dst.add_argument(*action.option_strings, type=action.type, nargs=action.nargs,
                             const=action.const, **kw)


def test_driver_turns_the_original_run_into_our_record(monkeypatch, tmp_path):
    import torch
    costs = [3.0] + [1.25] * 31
    homes = [SimpleNamespace(val=[_tensor(Kind.CPU, 3), _tensor(Kind.CUDA, 1)])]
    package = types.ModuleType("flexgen")
    package.__version__ = "0.1.8"
    fake = _fake_flex_opt(costs, homes)
    package.flex_opt = fake
    monkeypatch.setitem(sys.modules, "flexgen", package)
    monkeypatch.setitem(sys.modules, "flexgen.flex_opt", fake)
    fraction = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=80 * GB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fraction.append)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 7 * GB)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    args = _args(offload_dir=str(tmp_path))
    before = (fake.AutoTokenizer, fake.OptLM)
    rec = original.run(args)
    assert (fake.AutoTokenizer, fake.OptLM) == before   # the patch is undone after the run
    assert fraction == [pytest.approx(0.2)]
    assert rec["system"] == "original-flexgen" and rec["device"] == "NVIDIA H100 80GB HBM3"
    assert rec["prefill_latency_s"] == 3.0 and rec["decode_latency_s"] == pytest.approx(31 * 1.25)
    assert rec["total_throughput"] == pytest.approx(8 * 32 / (3.0 + 31 * 1.25))
    assert rec["percent"] == "25 75 100 0 100 0" and rec["requested_percent"] == "0 100 100 0 100 0"
    assert rec["weight_placement"] == {"gpu": 25.0, "cpu": 75.0, "disk": 0.0}
    assert rec["peak_gpu_mem_gb"] == 7.0 and rec["flexgen_version"] == "0.1.8"
    assert "total throughput" in rec["original_log"]
    # the record feeds the limit with the placement the original made
    lim = limits.record_limit(rec, limits.BUILTIN["h100-reference"])
    cfg = get_opt_config("opt-30b")
    assert lim.terms["weights over PCIe"] == pytest.approx(0.75 * cfg.model_bytes() / 54.7e9, rel=1e-9)


def test_main_without_flexgen_says_how(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flexgen", None)
    assert original.main(["--model", "opt-tiny", "--percent", "100", "0", "100", "0", "100", "0",
                          "--gpu-batch-size", "1"]) == 2
    assert "pip install flexgen==0.1.8" in capsys.readouterr().err


def test_suite_rows_run_the_original_side_by_side():
    cases = {c.case: c for c in suites.load_suite("h100-anchors")}
    for ours in ("a-6.7b-gpu", "c-30b-paper", "d-30b-wcpu"):
        orig = cases["orig-" + ours]
        assert orig.runner == "original" and orig.model == cases[ours].model
        assert (orig.gpu_batch_size, orig.num_gpu_batches) == (cases[ours].gpu_batch_size,
                                                               cases[ours].num_gpu_batches)
        assert orig.paper_throughput == cases[ours].paper_throughput  # the reference figure
    # the original's own percentages (its placement rule), not our equivalent of them
    assert cases["orig-c-30b-paper"].percent == "20 80 0 100 0 100"


def test_runner_command_and_skip(monkeypatch, tmp_path):
    import importlib.util
    case = next(c for c in suites.load_suite("h100-anchors") if c.case == "orig-c-30b-paper")
    s = runner.Settings(out=str(tmp_path), gpu_mem_gb=16.0, path="_DUMMY_", offload_dir="/tmp/off")
    cmd = runner.default_command(case, s, "r.json", "r.log")
    assert cmd[1:3] == ["-m", "flexgen_repro.bench.original"]
    args = original.build_parser().parse_args(cmd[3:])
    assert args.percent == [20, 80, 0, 100, 0, 100] and args.cpu_cache_compute
    assert (args.gpu_batch_size, args.num_gpu_batches, args.gpu_mem_gb) == (16, 3, 16.0)
    assert (args.overlap, args.pin_weight, args.json_file) == (True, True, "r.json")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flexgen" else real(name, *a))
    assert "pip install flexgen==0.1.8 attrs" in runner.why_not_run(case, s, {})
    with pytest.raises(ValueError, match="six whole percentages"):
        suites.Case(suite="x", index=0, case="o", model="opt-30b", prompt_len=8, gen_len=2,
                    percent="20.5 79.5 0 100 0 100", runner="original", gpu_batch_size=1,
                    num_gpu_batches=1).validate()


def test_tables_pair_ours_with_the_original_of_the_same_call(tmp_path):
    import json

    from flexgen_repro.bench import tables
    hw = {"gpu_name": "NVIDIA H100 80GB HBM3", "ram_gb": 125.9}
    base = dict(status="ok", model="opt-30b", prompt_len=512, gen_len=32, gpu_batch_size=8,
                num_gpu_batches=1, hardware=hw, paper_throughput=7.12)
    recs = [dict(base, case="d-30b-wcpu", runner="flexgen", total_throughput=7.0,
                 timestamp="2026-11-26T23:10:00+00:00", percent="0 100 100 0 100 0", index=2),
            dict(base, case="orig-d-30b-wcpu", runner="original", total_throughput=6.4,
                 timestamp="2026-11-26T23:20:00+00:00", percent="0 100 100 0 100 0", index=5),
            # another machine: paired but not called the same machine
            dict(base, case="a-6.7b-gpu", runner="flexgen", total_throughput=270.0, index=0,
                 timestamp="2026-11-26T23:10:00+00:00", paper_throughput=130.03, percent="p"),
            dict(base, case="orig-a-6.7b-gpu", runner="original", total_throughput=135.0, index=3,
                 timestamp="2026-11-26T23:11:00+00:00", paper_throughput=130.03, percent="p",
                 hardware={**hw, "ram_gb": 120.0})]
    pairs = {p["case"]: p for p in tables.side_by_side(recs)}
    assert pairs["d-30b-wcpu"]["ratio"] == pytest.approx(7.0 / 6.4) and pairs["d-30b-wcpu"]["same_machine"]
    assert pairs["a-6.7b-gpu"]["ratio"] == pytest.approx(2.0) and not pairs["a-6.7b-gpu"]["same_machine"]
    raw = tmp_path / "h100-anchors" / "raw"
    raw.mkdir(parents=True)
    for r in recs:
        (raw / f"{r['case']}.json").write_text(json.dumps(r))
    tables.write_markdown(tables.load_records(str(tmp_path / "h100-anchors")),
                          str(tmp_path / "t.md"), "h100-anchors")
    text = (tmp_path / "t.md").read_text()
    assert "| d-30b-wcpu | - | - | 7.00 | 6.40 | 1.09x | 7.12 | 0.899 | yes | 0 100 100 0 100 0 |" in text
    assert "| a-6.7b-gpu | - | - | 270.0 | 135.0 | 2.00x | 130.0 | 1.04 | no | p |" in text
