"""`setup-nvme`'s front door: `main()` (called by `invoke setup-nvme` and the scripts) and the
`python -m flexgen_repro.nvme` argument parser. Exit codes: 0 done, already done or dry run;
1 a command failed; 2 refused (nothing changed)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence, TextIO

from flexgen_repro.nvme.plan import CLOUDS, Options, Plan, plan_setup
from flexgen_repro.nvme.system import (
    execute, gather_state, invoking_user, owner_spec, resolve_target)

REFUSED, FAILED = 2, 1


def parse_devices(devices: str | Sequence[str]) -> tuple[str, ...]:
    """"nvme1n1,/dev/nvme2n1" -> ("/dev/nvme1n1", "/dev/nvme2n1"); symlinks such as
    /dev/disk/by-id/... are resolved to the drive they point at."""
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    paths = [d.strip() if d.strip().startswith("/") else f"/dev/{d.strip()}"
             for d in items if d.strip()]
    return tuple(os.path.realpath(p) if os.path.exists(p) else p for p in paths)


def report(plan: Plan, dry_run: bool, out: TextIO, err: TextIO) -> int | None:
    """Print findings, refusals and (in a dry run) the commands; an exit code when done."""
    print(f"# setup-nvme --cloud {plan.cloud}: target {plan.target}", file=out)
    for line in plan.findings:
        print(f"# {line}", file=out)
    for line in plan.unchecked:
        print(f"# not checked: {line}", file=out)
    if plan.refusals:
        for line in plan.refusals:
            print(f"setup-nvme: refused: {line}", file=err)
        print("setup-nvme: nothing was changed", file=err)
        return REFUSED
    if plan.already_mounted:
        return 0
    if dry_run:
        print("# dry run: nothing was changed; these commands would run:", file=out)
        print("\n".join(plan.script()), file=out)
        return 0
    return None


def main(cloud: str, mount_path: str = "~", devices: str | Sequence[str] = "",
         dry_run: bool = False, force: bool = False, *, vg_name: str = "flexgen_offload",
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Mount local NVMe at <mount_path>/flexllmgen_offload_dir; returns the exit code."""
    if cloud not in CLOUDS:
        print(f"setup-nvme: refused: unknown cloud {cloud!r}; choose one of "
              f"{', '.join(CLOUDS)} (--cloud aws|gcp)", file=err)
        return REFUSED
    user = invoking_user()
    target = resolve_target(mount_path, user.pw_dir)
    named = parse_devices(devices)
    try:
        state = gather_state(target, named, cloud)
    except RuntimeError as exc:
        print(f"setup-nvme: refused: {exc}", file=err)
        return REFUSED
    opts = Options(cloud=cloud, target=target, devices=named, dry_run=dry_run, force=force,
                   owner=owner_spec(user), vg_name=vg_name)
    plan = plan_setup(state, opts)
    code = report(plan, dry_run, out, err)
    if code is not None:
        return code
    if execute(plan.commands, out=out, err=err):
        return FAILED
    if not os.path.ismount(target):
        print(f"setup-nvme: the commands ran but {target} is not a mount point", file=err)
        return FAILED
    print(f"# done: {plan.volume} is mounted at {target}, owned by {opts.owner}", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The same options as `invoke setup-nvme`."""
    p = argparse.ArgumentParser(
        prog="python -m flexgen_repro.nvme",
        description="Mount this cloud machine's local NVMe drives at "
                    "<mount-path>/flexllmgen_offload_dir (AWS: one drive, xfs; GCP: an LVM "
                    "volume striped over all local drives, xfs).")
    p.add_argument("--cloud", required=True, help="aws or gcp")
    p.add_argument("--mount-path", default="~", help="parent of flexllmgen_offload_dir (default ~)")
    p.add_argument("--devices", default="",
                   help="comma-separated drives to use instead of the detected ones")
    p.add_argument("--dry-run", action="store_true", help="print the commands, change nothing")
    p.add_argument("--force", action="store_true",
                   help="erase a drive that holds a filesystem or partitions (never a mounted "
                        "or root drive)")
    p.add_argument("--vg-name", default="flexgen_offload", help="LVM volume group name (GCP)")
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m flexgen_repro.nvme ...`."""
    args = build_parser().parse_args(argv)
    return main(cloud=args.cloud, mount_path=args.mount_path, devices=args.devices,
                dry_run=args.dry_run, force=args.force, vg_name=args.vg_name)
