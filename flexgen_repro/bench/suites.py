"""Benchmark suites as data: one CSV file per suite under `suites/`, one case per row.

A row holds the case's model, lengths, policy (the six `--percent` numbers or `auto`), the flags
`flex_opt` takes, an optional GPU memory cap, and the reference figure it is compared with (the
paper's, or the original FlexGen's on the same card) with where that figure comes from and whether
it was measured or projected; for `auto`, the cost-model profile that picks (`hardware`); and how
many times the case runs in one call (`repeat`, expanded in rounds by `load_suite`, so that ours and
the original's twin of each round form one same-call pair). `load_suite` parses and validates every
row, so a bad row fails with its file, line and column before anything runs.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Callable

from flexgen_repro.config import LlamaConfig, OptConfig, get_model_config
from flexgen_repro.options import DISK_IO_MODES
from flexgen_repro.policy import Policy, parse_percent

SUITES_DIR = os.path.join(os.path.dirname(__file__), "suites")
RUNNERS = ("flexgen", "accelerate", "deepspeed", "original", "text", "text-hf", "text-fixed",
           "flexgen-dist", "original-dist")
TEXT_RUNNERS = ("text", "text-hf", "text-fixed")  # text_bench.py: the job on the corpus, its twins
DIST_RUNNERS = ("flexgen-dist", "original-dist")  # pipeline parallel over `gpus` ranks (multi_gpu.py)
WEIGHTS = ("dummy", "real")
# What `invoke bench` runs with no suite on a machine with a GPU: needs no downloads (dummy
# weights), a minute or two on an H100: case A (OPT-6.7B on the GPU) and OPT-1.3B streaming its
# weights from host memory with the overlapped schedule.
DEFAULT_CPU_SUITE = "smoke"
DEFAULT_GPU_SUITE = "h100-anchors"
DEFAULT_GPU_CASES = ("a-6.7b-gpu", "1.3b-wcpu-overlap-1x16")
_CASE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"expected 1/0/true/false, got {text!r}")


def _opt_float(text: str) -> float | None:
    return float(text) if text.strip() else None


def _opt_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _opt_bool(text: str) -> bool | None:
    return _bool(text) if text.strip() else None


def _percent(text: str) -> str:
    if text.strip() == "auto":
        return "auto"
    return " ".join(f"{v:g}" for v in parse_percent(text.split()))


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {list(options)}, got {text!r}")
        return text
    return parse


# column -> (parser, default when the cell is empty; None default with required=True means required)
_COLUMNS: dict[str, tuple[Callable[[str], object], object, bool]] = {
    "case": (str, None, True),
    "runner": (_choice(RUNNERS), "flexgen", False),
    "model": (str, None, True),
    "weights": (_choice(WEIGHTS), "dummy", False),
    "prompt_len": (int, None, True),
    "gen_len": (int, None, True),
    "percent": (_percent, None, True),
    "gpu_batch_size": (_opt_int, None, False),
    "num_gpu_batches": (_opt_int, None, False),
    "overlap": (_bool, True, False),
    "sep_layer": (_bool, True, False),
    "pin_weight": (_bool, True, False),
    "cpu_cache_compute": (_bool, False, False),
    "compress_weight": (_bool, False, False),
    "compress_cache": (_bool, False, False),
    "attn_sparsity": (float, 1.0, False),
    "dtype": (_choice(("float16", "float32", "bfloat16")), "float16", False),
    "gpu_mem_gb": (_opt_float, None, False),
    "timeout_s": (float, 1800.0, False),
    "hardware": (str, "", False),
    "repeat": (int, 1, False),
    "gpus": (int, 1, False),
    "disk_io": (_choice(DISK_IO_MODES), "auto", False),
    "prompts": (_opt_int, None, False),
    "paper_throughput": (_opt_float, None, False),
    "paper_system": (str, "", False),
    "paper_measured": (_opt_bool, None, False),
    "paper_source": (str, "", False),
    "note": (str, "", False),
}


@dataclass(frozen=True)
class Case:
    """One benchmark case: a row of a suite file."""
    suite: str
    index: int
    case: str
    model: str
    prompt_len: int
    gen_len: int
    percent: str  # "a b c d e f" or "auto"
    runner: str = "flexgen"
    weights: str = "dummy"
    gpu_batch_size: int | None = None
    num_gpu_batches: int | None = None
    overlap: bool = True
    sep_layer: bool = True
    pin_weight: bool = True
    cpu_cache_compute: bool = False
    compress_weight: bool = False
    compress_cache: bool = False
    attn_sparsity: float = 1.0
    dtype: str = "float16"
    gpu_mem_gb: float | None = None
    timeout_s: float = 1800.0
    hardware: str = ""      # the cost-model profile `--percent auto` picks with ("": flex_opt's default)
    repeat: int = 1         # runs of the case in one call (see expand_repeats)
    gpus: int = 1           # GPUs (pipeline stages) of a flexgen-dist / original-dist case
    disk_io: str = "auto"   # how our runtime reads the disk tier (flex_opt --disk-io)
    prompts: int | None = None  # corpus prompts a TEXT_RUNNERS case runs (None: the whole corpus)
    paper_throughput: float | None = None
    paper_system: str = ""
    paper_measured: bool | None = None
    paper_source: str = ""
    note: str = ""

    @property
    def auto(self) -> bool:
        return self.percent == "auto"

    def config(self) -> OptConfig | LlamaConfig:
        return get_model_config(self.model, dtype=self.dtype)

    def policy(self) -> Policy | None:
        """The case's Policy, or None for `--percent auto` (the cost model picks it at run time)."""
        if self.auto:
            return None
        p = [float(v) for v in self.percent.split()]
        p = [int(v) if v.is_integer() else v for v in p]
        return Policy(gpu_batch_size=self.gpu_batch_size, num_gpu_batches=self.num_gpu_batches,
                      w_gpu_percent=p[0], w_cpu_percent=p[1], cache_gpu_percent=p[2],
                      cache_cpu_percent=p[3], act_gpu_percent=p[4], act_cpu_percent=p[5],
                      overlap=self.overlap, sep_layer=self.sep_layer, pin_weight=self.pin_weight,
                      cpu_cache_compute=self.cpu_cache_compute, attn_sparsity=self.attn_sparsity,
                      compress_weight=self.compress_weight, compress_cache=self.compress_cache)

    def validate(self) -> None:
        """Raise ValueError naming the problem if the case cannot describe a run."""
        if not _CASE_ID.match(self.case):
            raise ValueError(f"case id {self.case!r} must be lower-case letters, digits, '.', '_' or '-'")
        config = self.config()
        if self.prompt_len < 1 or self.gen_len < 1:
            raise ValueError(f"prompt_len and gen_len must be >= 1, got {self.prompt_len}, {self.gen_len}")
        if self.prompt_len + self.gen_len > config.max_seq_len:
            raise ValueError(f"prompt_len + gen_len = {self.prompt_len + self.gen_len} exceeds "
                             f"{config.name}'s {config.max_seq_len} positions")
        if self.repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {self.repeat}")
        if self.hardware and not self.auto:
            raise ValueError("hardware names the profile of `percent auto`; leave it empty otherwise")
        if self.gpu_mem_gb is not None and self.gpu_mem_gb <= 0:
            raise ValueError(f"gpu_mem_gb must be > 0 (or empty for no cap), got {self.gpu_mem_gb}")
        if self.gpus < 1 or (self.gpus > 1 and self.runner not in DIST_RUNNERS):
            raise ValueError(f"gpus must be >= 1, and above 1 only for {DIST_RUNNERS}, got {self.gpus}")
        if self.disk_io != "auto" and self.runner != "flexgen":
            raise ValueError(f"disk_io sets our runtime's --disk-io: only for flexgen cases, "
                             f"not {self.runner!r} (leave it empty)")
        if self.prompts is not None and (self.runner not in TEXT_RUNNERS or self.prompts < 1):
            raise ValueError(f"prompts counts the corpus prompts of a {'/'.join(TEXT_RUNNERS)} case (>= 1), "
                             f"got {self.prompts} for a {self.runner!r} case")
        if self.runner in ("accelerate", "deepspeed", "original", "original-dist"):
            if self.auto or self.gpu_batch_size is None:
                raise ValueError(f"a {self.runner} case needs an explicit percent and gpu_batch_size")
            if self.runner.startswith("original") and not all(v.isdigit() for v in self.percent.split()):
                raise ValueError(f"the original takes six whole percentages, got {self.percent!r}")
            return
        if not self.auto:
            if self.gpu_batch_size is None or self.num_gpu_batches is None:
                raise ValueError("gpu_batch_size and num_gpu_batches are required unless percent is auto")
            self.policy()


def suite_names() -> list[str]:
    """The suites shipped under suites/, by file name."""
    return sorted(f[:-4] for f in os.listdir(SUITES_DIR) if f.endswith(".csv"))


def suite_file(name: str) -> str:
    names = suite_names()
    if name not in names:
        raise ValueError(f"unknown suite {name!r}; choose one of: {', '.join(names)}")
    return os.path.join(SUITES_DIR, f"{name}.csv")


def _parse_row(suite: str, index: int, row: dict[str, str], where: str) -> Case:
    values: dict[str, object] = {}
    for column, (parse, default, required) in _COLUMNS.items():
        text = (row.get(column) or "").strip()
        if not text:
            if required:
                raise ValueError(f"{where}: column {column!r} is required")
            values[column] = default
            continue
        try:
            values[column] = parse(text)
        except ValueError as e:
            raise ValueError(f"{where}: column {column!r}: {e}") from None
    return Case(suite=suite, index=index, **values)


def read_cases(path: str, suite: str | None = None) -> list[Case]:
    """Parse and validate a suite CSV file (any path); errors name the file, line and column."""
    suite = suite or os.path.splitext(os.path.basename(path))[0]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        unknown = set(reader.fieldnames or ()) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"{path}: unknown columns {sorted(unknown)}; known: {list(_COLUMNS)}")
        cases, seen = [], set()
        for index, row in enumerate(reader):
            where = f"{path}, line {reader.line_num}"
            case = _parse_row(suite, index, row, where)
            try:
                case.validate()
            except ValueError as e:
                raise ValueError(f"{where} (case {case.case!r}): {e}") from None
            if case.case in seen:
                raise ValueError(f"{where}: case id {case.case!r} appears twice")
            seen.add(case.case)
            cases.append(case)
    if not cases:
        raise ValueError(f"{path}: the suite has no cases")
    return cases


def load_suite(name: str) -> list[Case]:
    """The validated cases of a shipped suite, in file order, repeats expanded (expand_repeats)."""
    return expand_repeats(read_cases(suite_file(name), name))


REPEAT_SUFFIX = ".rep"


def expand_repeats(cases: list[Case]) -> list[Case]:
    """Each case `repeat` times, in rounds: every case once (ids as written), then the cases with
    repeat >= 2 again as `<id>.rep2`, and so on. A case and its `orig-` twin of the same round
    then run close together in one call, so each round is one same-call pair (tables.py)."""
    out = []
    for r in range(1, max(c.repeat for c in cases) + 1):
        for c in cases:
            if c.repeat >= r:
                name = c.case if r == 1 else f"{c.case}{REPEAT_SUFFIX}{r}"
                out.append(dataclasses.replace(c, case=name, index=len(out)))
    return out


def base_case(case_id: str) -> tuple[str, int]:
    """("x", 2) for "x.rep2"; (case_id, 1) for a case id without a repeat suffix."""
    head, sep, tail = case_id.rpartition(REPEAT_SUFFIX)
    if sep and tail.isdigit() and int(tail) >= 2:
        return head, int(tail)
    return case_id, 1


def select_cases(cases: list[Case], wanted: str | list[str] | tuple[str, ...] | None) -> list[Case]:
    """The cases named in `wanted` ("a,b" or a list), in suite order; all when empty."""
    if isinstance(wanted, str):
        wanted = [w.strip() for w in wanted.split(",") if w.strip()]
    if not wanted:
        return list(cases)
    ids = [c.case for c in cases]
    missing = [w for w in wanted if w not in ids]
    if missing:
        raise ValueError(f"unknown case(s) {missing} in suite {cases[0].suite!r}; "
                         f"choose from: {', '.join(i for i in ids if base_case(i)[1] == 1)}")
    # a case named without a repeat suffix brings its repeats along
    return [c for c in cases if c.case in wanted or base_case(c.case)[0] in wanted]
