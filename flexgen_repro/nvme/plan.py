"""The setup plan: from lsblk's JSON and the options to the exact commands, with the findings
behind them and every reason to refuse. Pure: the same inputs give the same plan, and nothing
here touches the machine (system.py gathers the inputs and runs the commands)."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from flexgen_repro.nvme.drives import (
    BlockDevice, describe_model, dm_name, find_device, hard_problems, local_drives, parse_lsblk,
    soft_problems)

CLOUDS = ("aws", "gcp")
OFFLOAD_DIR_NAME = "flexllmgen_offload_dir"
STRIPE_SIZE = "1m"  # LVM stripe size on GCP: 1 MiB
# A dry run on a machine without the cloud's local drives plans for these stand-ins: AWS's first
# instance-store drive, and the names GCP gives two local NVMe SSDs under /dev/disk/by-id.
DRY_RUN_STAND_INS = {"aws": ("/dev/nvme1n1",),
                     "gcp": ("/dev/disk/by-id/google-local-nvme-ssd-0",
                             "/dev/disk/by-id/google-local-nvme-ssd-1")}
PACKAGES = {"mkfs.xfs": "xfsprogs", "pvcreate": "lvm2", "vgcreate": "lvm2", "lvcreate": "lvm2",
            "wipefs": "util-linux", "mount": "util-linux", "mkdir": "coreutils",
            "chown": "coreutils"}


@dataclass(frozen=True)
class Options:
    """What the user asked for. `target` is the absolute mount point
    (<mount-path>/flexllmgen_offload_dir); `devices` empty means detect the local drives."""
    cloud: str
    target: str
    devices: tuple[str, ...] = ()
    dry_run: bool = False
    force: bool = False
    owner: str = "root:root"
    vg_name: str = "flexgen_offload"
    lv_name: str = "offload"


@dataclass(frozen=True)
class SystemState:
    """What the machine looks like: lsblk's JSON tree, whether we are root, what (if anything)
    is mounted at the target, which tools are missing, and checks the gatherer could not make."""
    lsblk: dict
    is_root: bool
    target_source: str | None = None
    missing_tools: frozenset[str] = frozenset()
    unchecked: tuple[str, ...] = ()
    target_nonempty: bool = False


@dataclass(frozen=True)
class Plan:
    """The commands to run (empty when refused or already done) and why."""
    cloud: str
    target: str
    drives: tuple[str, ...] = ()
    volume: str = ""
    commands: tuple[tuple[str, ...], ...] = ()
    findings: tuple[str, ...] = ()
    refusals: tuple[str, ...] = ()
    unchecked: tuple[str, ...] = ()
    already_mounted: bool = False

    def script(self) -> list[str]:
        """The commands, one shell-quoted line each."""
        return [shlex.join(cmd) for cmd in self.commands]


@dataclass
class _Draft:
    findings: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)


def _gb(size: int) -> str:
    return f"{size / 1e9:,.0f} GB"


def _describe(drive: BlockDevice, cloud: str, named: bool = False) -> str:
    what, local = describe_model(cloud, drive.model)
    model = f", {drive.model}" if drive.model else ""
    unused = "" if local or named else ", not used"
    return f"{drive.path} ({_gb(drive.size)}{model}, {drive.type}): {what}{unused}"


def _named_drives(devices: list[BlockDevice], opts: Options, draft: _Draft) -> list[str]:
    """The drives named with --devices; absent ones are refused, or noted in a dry run."""
    paths = [d if d.startswith("/") else f"/dev/{d}" for d in opts.devices]
    for dup in sorted({p for p in paths if paths.count(p) > 1}):
        draft.refusals.append(f"{dup} is named twice in --devices; name each drive once")
    for path in paths:
        node = find_device(devices, path)
        if node is not None:
            draft.findings.append(f"using {_describe(node, opts.cloud, named=True)} "
                                 "(named with --devices)")
        elif opts.dry_run:
            draft.unchecked.append(f"{path} is not present (lsblk does not list it), so these "
                                   "checks were not made: that it exists, is not mounted, is not "
                                   "the root disk, and holds no filesystem or partitions")
        else:
            draft.refusals.append(f"{path} not found: lsblk does not list it; check the name "
                                  "with `lsblk -o NAME,SIZE,MODEL` and pass it with --devices")
    if opts.cloud == "aws" and len(paths) > 1:
        draft.refusals.append(f"the AWS setup uses one drive, but --devices names {len(paths)}; "
                              "name one drive, or use --cloud gcp to stripe over several")
    return list(dict.fromkeys(paths))


def _detected_drives(devices: list[BlockDevice], opts: Options, draft: _Draft) -> list[str]:
    """The cloud's local NVMe drives: the largest (first on ties) on AWS, all of them on GCP."""
    disks = [d for d in devices if d.type == "disk"]
    for disk in disks:
        draft.findings.append(f"found {_describe(disk, opts.cloud)}")
    local = local_drives(devices, opts.cloud)
    if not local:
        models = sorted({d.model or "(none)" for d in disks}) or ["(no disks)"]
        kind = ("instance-store NVMe (instance types such as i4i, p4d, g4dn)" if opts.cloud == "aws"
                else "local SSDs with the NVMe interface")
        if opts.dry_run:
            stand_ins = DRY_RUN_STAND_INS[opts.cloud]
            draft.unchecked.append(
                f"no local NVMe drives here (drive models seen: {', '.join(models)}), so the plan "
                f"uses {', '.join(stand_ins)} in their place; on a machine with {kind} it uses the "
                "drives it detects. These checks were not made: which drives are local, that they "
                "are not mounted, not the root disk, and hold no filesystem or partitions")
            return list(stand_ins)
        draft.refusals.append(f"no local NVMe drives found on this {opts.cloud} machine (drive "
                              f"models seen: {', '.join(models)}); use a machine with {kind}, or "
                              "name the drives with --devices")
        return []
    if opts.cloud == "aws":
        chosen = max(local, key=lambda d: d.size).path
        draft.findings.append(f"chose {chosen}: the largest local drive (the first on ties); "
                              "the AWS setup uses one drive")
        return [chosen]
    draft.findings.append(f"striping over all {len(local)} local drives: "
                          + ", ".join(d.path for d in local))
    return [d.path for d in local]


def _volume(opts: Options, drives: list[str]) -> str:
    if opts.cloud == "aws":
        return drives[0]
    return f"/dev/{opts.vg_name}/{opts.lv_name}"


def _mount_sources(devices: list[BlockDevice], state: SystemState, target: str) -> set[str]:
    """Every device that lsblk or findmnt says is mounted at the target."""
    found = {node.path for top in devices for node in [top, *top.descendants()]
             if target in node.mountpoints}
    return found | ({state.target_source} if state.target_source else set())


def _planned_sources(opts: Options, drives: list[str]) -> set[str]:
    """The names the planned drive/volume goes by in lsblk and findmnt."""
    if opts.cloud == "aws":
        return {drives[0]}
    return {_volume(opts, drives), f"/dev/mapper/{dm_name(opts.vg_name, opts.lv_name)}"}


def _check_existing_mount(devices: list[BlockDevice], state: SystemState, opts: Options,
                          drives: list[str], draft: _Draft) -> bool:
    """True when the target is already mounted from the planned drive/volume (nothing to do);
    a refusal when something else is mounted there."""
    target, volume = opts.target, _volume(opts, drives)
    sources = _mount_sources(devices, state, target)
    if not sources:
        return False
    if not sources & _planned_sources(opts, drives):
        draft.refusals.append(f"{target} is already a mount point (of "
                              f"{', '.join(sorted(sources))}); unmount it (sudo umount {target}) "
                              "or choose another --mount-path")
        return False
    lv = dm_name(opts.vg_name, opts.lv_name)
    outside = [p for p in drives if opts.cloud == "gcp"
               and (node := find_device(devices, p)) is not None
               and all(c.name != lv for c in node.descendants())]
    if outside:
        draft.refusals.append(f"{target} is mounted from {volume}, which does not span "
                              f"{', '.join(outside)}; to rebuild it over all drives, unmount it, "
                              f"run `sudo vgremove {opts.vg_name}`, then rerun")
        return False
    draft.findings.append(f"{target} is already mounted from {volume}; nothing to do")
    return True


def _check_drives(devices: list[BlockDevice], opts: Options, drives: list[str],
                  draft: _Draft) -> list[str]:
    """Refuse unsafe drives; return those that need erasing first (only with --force)."""
    to_wipe: list[str] = []
    for path in drives:
        node = find_device(devices, path)
        if node is None:
            continue
        hard, soft = hard_problems(node), soft_problems(node)
        draft.refusals.extend(hard)
        if soft and opts.force and not hard:
            draft.findings.append(f"--force: erasing {path} ({'; '.join(soft)})")
            to_wipe.append(path)
        elif not opts.force:
            draft.refusals.extend(soft)
    return to_wipe


def _commands(opts: Options, drives: list[str], to_wipe: list[str]) -> list[tuple[str, ...]]:
    """AWS: xfs on the drive. GCP: an LVM volume striped (1 MiB) over the drives, then xfs."""
    cmds: list[tuple[str, ...]] = [("wipefs", "-a", path) for path in to_wipe]
    force = ("-f",) if opts.force else ()
    if opts.cloud == "gcp":
        stripes = ("-i", str(len(drives)), "-I", STRIPE_SIZE) if len(drives) > 1 else ()
        cmds += [("pvcreate", *(("-y",) if opts.force else ()), *drives),
                 ("vgcreate", opts.vg_name, *drives),
                 ("lvcreate", "-y", "-n", opts.lv_name, *stripes, "-l", "100%FREE", opts.vg_name)]
    volume = _volume(opts, drives)
    return cmds + [("mkfs.xfs", *force, volume), ("mkdir", "-p", opts.target),
                   ("mount", "-o", "noatime", volume, opts.target),
                   ("chown", opts.owner, opts.target)]


def _check_machine(state: SystemState, opts: Options, cmds: list[tuple[str, ...]],
                   draft: _Draft) -> None:
    """Root and the tools the commands need."""
    for tool in sorted({c[0] for c in cmds} & state.missing_tools):
        pkg = PACKAGES.get(tool, tool)
        text = (f"{tool} is not installed; install {pkg} (Debian/Ubuntu: sudo apt-get install -y "
                f"{pkg}; Amazon Linux/RHEL: sudo yum install -y {pkg})")
        (draft.unchecked if opts.dry_run else draft.refusals).append(text)
    if not opts.dry_run and not state.is_root:
        draft.refusals.append("formatting and mounting drives needs root: rerun through sudo "
                              "(for example `sudo $(which python3) -m flexgen_repro.nvme ...` "
                              "or scripts/mount_nvme_<cloud>.sh), or pass --dry-run to see the "
                              "commands")
    if state.target_nonempty:
        draft.findings.append(f"warning: {opts.target} already holds files; they stay hidden "
                              "(not deleted) while the drive is mounted over them")


def plan_setup(state: SystemState, opts: Options) -> Plan:
    """The plan for `setup-nvme`: commands, findings, refusals and the checks not made."""
    if opts.cloud not in CLOUDS:
        return Plan(opts.cloud, opts.target, refusals=(
            f"unknown cloud {opts.cloud!r}; choose one of {', '.join(CLOUDS)} (--cloud aws|gcp)",))
    devices = parse_lsblk(state.lsblk)
    draft = _Draft(unchecked=list(state.unchecked))
    pick = _named_drives if opts.devices else _detected_drives
    drives = pick(devices, opts, draft)
    done = bool(drives) and _check_existing_mount(devices, state, opts, drives, draft)
    cmds: list[tuple[str, ...]] = []
    if drives and not done:
        to_wipe = _check_drives(devices, opts, drives, draft)
        cmds = _commands(opts, drives, to_wipe)
        _check_machine(state, opts, cmds, draft)
    refused = bool(draft.refusals)
    return Plan(opts.cloud, opts.target, tuple(drives), _volume(opts, drives) if drives else "",
                () if refused else tuple(cmds), tuple(draft.findings), tuple(draft.refusals),
                tuple(draft.unchecked), already_mounted=done and not refused)
