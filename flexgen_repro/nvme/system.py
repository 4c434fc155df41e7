"""The machine side of `setup-nvme`: gather the planner's inputs (lsblk, findmnt, blkid, the
invoking user) and run a plan's commands, stopping at the first failure."""
from __future__ import annotations

import copy
import grp
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from typing import Callable, TextIO

from flexgen_repro.nvme.drives import local_drives, parse_lsblk
from flexgen_repro.nvme.plan import OFFLOAD_DIR_NAME, PACKAGES, SystemState

LSBLK_COLUMNS = "NAME,PATH,TYPE,SIZE,MODEL,SERIAL,MOUNTPOINTS,FSTYPE,PKNAME"
LSBLK_COLUMNS_OLD = "NAME,TYPE,SIZE,MODEL,SERIAL,MOUNTPOINT,FSTYPE,PKNAME"  # util-linux < 2.37
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def tool_env() -> dict[str, str]:
    """The environment for the commands: sbin on PATH, LVM's fd-leak warnings off."""
    env = dict(os.environ)
    env["PATH"] = f"{env.get('PATH', '')}:{SBIN}".lstrip(":")
    env["LVM_SUPPRESS_FD_WARNINGS"] = "1"
    return env


def run_lsblk() -> dict:
    """lsblk's JSON tree of every block device (older util-linux: without PATH/MOUNTPOINTS)."""
    errors = []
    for columns in (LSBLK_COLUMNS, LSBLK_COLUMNS_OLD):
        try:
            res = subprocess.run(["lsblk", "-J", "-b", "-o", columns], capture_output=True,
                                 text=True, env=tool_env(), timeout=60)
        except FileNotFoundError:
            raise RuntimeError("lsblk is not installed; install util-linux") from None
        if res.returncode == 0:
            return json.loads(res.stdout)
        errors.append(res.stderr.strip())
    raise RuntimeError(f"lsblk failed: {' / '.join(errors)}")


def probe_signatures(doc: dict, paths: list[str]) -> dict:
    """A copy of lsblk's tree where whole drives without FSTYPE get what `blkid -p` finds on them
    (a filesystem, an LVM label or a partition table). lsblk reads FSTYPE from udev, which
    containers and minimal images lack; blkid reads the drive itself (needs root)."""
    doc = copy.deepcopy(doc)
    for raw in doc.get("blockdevices", []):
        path = raw.get("path") or f"/dev/{raw['name']}"
        if raw.get("fstype") or path not in paths:
            continue
        res = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True,
                             text=True, env=tool_env(), timeout=30)
        found = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        if "TYPE" in found:
            raw["fstype"] = found["TYPE"]
        elif "PTTYPE" in found:
            raw["fstype"] = f"{found['PTTYPE']} partition table"
    return doc


def invoking_user() -> pwd.struct_passwd:
    """The user the offload folder belongs to: SUDO_USER when run through sudo, else ourselves."""
    sudo_user = os.environ.get("SUDO_USER")
    if os.geteuid() == 0 and sudo_user and sudo_user != "root":
        try:
            return pwd.getpwnam(sudo_user)
        except KeyError:
            pass
    return pwd.getpwuid(os.geteuid())


def owner_spec(user: pwd.struct_passwd) -> str:
    """user:group for chown (numeric group when it has no name)."""
    try:
        group = grp.getgrgid(user.pw_gid).gr_name
    except KeyError:
        group = str(user.pw_gid)
    return f"{user.pw_name}:{group}"


def resolve_target(mount_path: str, home: str) -> str:
    """<mount-path>/flexllmgen_offload_dir as an absolute path; a leading ~ is `home` (the
    invoking user's, not root's, when run through sudo)."""
    if mount_path == "~" or mount_path.startswith("~/"):
        mount_path = home + mount_path[1:]
    path = os.path.realpath(os.path.expanduser(mount_path))
    return os.path.join(path, OFFLOAD_DIR_NAME)


def mounted_source(target: str) -> str | None:
    """The device mounted at `target`, or None when it is not a mount point."""
    if not os.path.ismount(target):
        return None
    res = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", target],
                         capture_output=True, text=True, timeout=30)
    return res.stdout.strip() or "an unknown device"


def gather_state(target: str, devices: tuple[str, ...], cloud: str) -> SystemState:
    """Everything the planner needs to know about this machine. The named `devices` (else the
    cloud's local drives) are probed for signatures."""
    is_root = os.geteuid() == 0
    doc = run_lsblk()
    unchecked: list[str] = []
    if is_root:
        probe = list(devices) or [d.path for d in local_drives(parse_lsblk(doc), cloud)]
        doc = probe_signatures(doc, probe)
    else:
        unchecked.append("filesystem signatures come from lsblk's FSTYPE column only (probing the "
                         "drives with blkid needs root)")
    path = tool_env()["PATH"]
    missing = frozenset(t for t in PACKAGES if shutil.which(t, path=path) is None)
    nonempty = (os.path.isdir(target) and not os.path.ismount(target)
                and bool(os.listdir(target)))
    return SystemState(lsblk=doc, is_root=is_root, target_source=mounted_source(target),
                       missing_tools=missing, unchecked=tuple(unchecked), target_nonempty=nonempty)


def execute(commands: tuple[tuple[str, ...], ...], out: TextIO = sys.stdout,
            err: TextIO = sys.stderr, timeout: float | None = None,
            runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """Run the commands in order; at the first failure print it with its stderr and return 1."""
    for i, cmd in enumerate(commands):
        line = shlex.join(cmd)
        print(f"+ {line}", file=out, flush=True)
        try:
            res = runner(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         env=tool_env(), timeout=timeout)
        except FileNotFoundError:
            pkg = PACKAGES.get(cmd[0], cmd[0])
            return _failed(line, f"{cmd[0]} is not installed (package {pkg})", commands[:i], err)
        except subprocess.TimeoutExpired:
            return _failed(line, f"still running after {timeout} s; stopped", commands[:i], err)
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip() or "(no output)"
            return _failed(line, f"exit {res.returncode}: {detail}", commands[:i], err)
    return 0


def _failed(line: str, why: str, done: tuple[tuple[str, ...], ...], err: TextIO) -> int:
    print(f"setup-nvme: command failed: {line}\n  {why.replace(chr(10), chr(10) + '  ')}",
          file=err)
    if done:
        print("already done before it (undo by hand if needed): "
              + "; ".join(shlex.join(c) for c in done), file=err)
    return 1
