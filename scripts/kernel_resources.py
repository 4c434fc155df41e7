"""Registers, spills and instruction counts of the fused 4-bit decode matmul, compiled ahead of time.

    python scripts/kernel_resources.py [--arch 90] [--rows 1,16,32,64,128] [--json OUT.json]

Compiles kernels/dequant_matmul.py's kernels (weights grouped along out and along in) for a CUDA
architecture with Triton's own compiler and ptxas, no GPU needed, at the block sizes
`decode_config` picks for each row count of x (and, with --sweep, for every rows-per-program and
warp count around it), and prints per configuration: registers per thread, spilled bytes, the
size of the compiled kernel in SASS instructions times its warps times the programs that cover
the rows (`ceil(rows / BLOCK_M)`, each reading every packed byte): a static count with the loop
body once, and every configuration moves the same packed bytes per loop turn, so it compares the
work issued per packed byte; the kernels are bound by their dequantizing arithmetic, so more is
slower. Also the matrix instruction used (mma.sync or Hopper's wgmma). `decode_config` promises
no spills on sm_90; exit code 1 if a configuration it picks spills, 2 without Triton's CUDA tools.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)   # compiled, never run: the interpreter has nothing to compile

POINTERS = {"x": "*fp16", "data": "*u8", "scale": "*fp16", "mn": "*fp16", "bias": "*fp16", "y": "*fp32"}
GROUP_BYTES, GROUP_SIZE, HIDDEN = 32, 64, 4096   # the weights' default 4-bit compression, OPT-6.7B


def _tools():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton.backends.nvidia as nvidia
    except ImportError as e:
        raise SystemExit(f"error: needs triton with its CUDA backend ({e}); pip install triton") from None
    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        raise SystemExit(f"error: Triton's cuobjdump is missing ({cuobjdump}); reinstall triton")
    return triton, GPUTarget, ASTSource, cuobjdump


def compile_config(kernel: str, cfg: dict, arch: int) -> dict:
    """Compile one kernel ('rows': grouped along out; 'cols': along in) at `cfg` (decode_config's
    keys) for sm_<arch>; its resources and instruction counts."""
    triton, GPUTarget, ASTSource, cuobjdump = _tools()
    from flexgen_repro.kernels import dequant_matmul as dm
    fn = dm._rows_kernel if kernel == "rows" else dm._cols_kernel
    consts = {"P": GROUP_BYTES, "GS": GROUP_SIZE, "ZERO": 0.0, "BLOCK_M": cfg["BLOCK_M"],
              "HAS_BIAS": False, "PREC": "tf32"}
    consts.update({"BLOCK_R": cfg["BLOCK_OUT"], "BLOCK_K": cfg["BLOCK_K"]} if kernel == "rows"
                  else {"BLOCK_N": cfg["BLOCK_OUT"]})
    sig = {name: "constexpr" if name in consts else POINTERS.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg["num_warps"]})
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    instructions = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    ptx = compiled.asm["ptx"]
    return {"kernel": kernel, **cfg, "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(local.group(1)) if local else 0,
            "sass_per_program": len(instructions) * cfg["num_warps"],
            "matrix_op": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"}


def configs(rows: int, sweep: bool) -> list[tuple[str, dict]]:
    """decode_config's picks for `rows` rows of x on a 132-SM card, for both kernels; with `sweep`
    also every rows-per-program (16..128, at least a quarter of `rows`) and warp count (4, 8)."""
    from flexgen_repro.kernels import dequant_matmul as dm
    out = []
    for kernel, units, group_dim in (("rows", HIDDEN // GROUP_SIZE * GROUP_BYTES, 0), ("cols", HIDDEN, 1)):
        picked = dm.decode_config(rows, units, group_dim, 132, GROUP_BYTES)
        out.append((kernel, {**picked, "picked": True}))
        if sweep:
            for block_m in (16, 32, 64, 128):
                for warps in (4, 8):
                    cfg = {**picked, "BLOCK_M": block_m, "num_warps": warps, "picked": False}
                    if (block_m, warps) != (picked["BLOCK_M"], picked["num_warps"]) and block_m * 4 >= rows:
                        out.append((kernel, cfg))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    ap.add_argument("--rows", default="1,16,32,64,128", help="rows of x (decode batch), comma-separated")
    ap.add_argument("--sweep", action="store_true",
                    help="also the rows-per-program and warps around each pick")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        print(f"error: --rows takes whole numbers separated by commas, got {args.rows!r}", file=sys.stderr)
        return 2
    if any(r < 1 for r in rows):
        print("error: --rows must be >= 1", file=sys.stderr)
        return 2
    try:
        _tools()
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    results, spilled = [], False
    print(f"{'rows':>5} {'kernel':6} {'BLOCK_M':>7} {'warps':>5} {'regs':>5} {'spill':>6} "
          f"{'sass, all rows':>14}  matrix op")
    for m in rows:
        for kernel, cfg in configs(m, args.sweep):
            row = {"rows": m, **compile_config(kernel, cfg, args.arch)}
            row["sass_all_rows"] = row["sass_per_program"] * -(-m // row["BLOCK_M"])
            results.append(row)
            spilled |= cfg["picked"] and row["spill_bytes"] > 0
            mark = "*" if cfg["picked"] else " "
            print(f"{m:>5} {kernel:6} {row['BLOCK_M']:>7} {row['num_warps']:>5} {row['registers']:>5} "
                  f"{row['spill_bytes']:>6} {row['sass_all_rows']:>14}  {row['matrix_op']} {mark}")
    print("* decode_config's pick")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "rows": results}, f, indent=2)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
