"""Block devices as `lsblk -J` reports them: parsing, cloud drive classification and the safety
checks a drive must pass before it is erased. Pure functions over the JSON; nothing here runs a
command."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Drive models by cloud: (model, what it is, local?). lsblk pads some models with spaces.
CLOUD_MODELS: dict[str, dict[str, tuple[str, bool]]] = {
    "aws": {"Amazon EC2 NVMe Instance Storage": ("local instance-store NVMe", True),
            "Amazon Elastic Block Store": ("EBS volume", False)},
    "gcp": {"nvme_card": ("local NVMe SSD", True),
            "nvme_card-pd": ("persistent disk (NVMe interface)", False),
            "PersistentDisk": ("persistent disk (SCSI interface)", False),
            "EphemeralDisk": ("local SSD on the SCSI interface (not NVMe)", False)},
}
WHOLE_DRIVE_TYPES = ("disk", "loop")


@dataclass(frozen=True)
class BlockDevice:
    """One node of lsblk's tree: a drive, a partition, or a volume built on top of them."""
    name: str
    path: str
    type: str
    size: int
    model: str = ""
    serial: str = ""
    fstype: str | None = None
    mountpoints: tuple[str, ...] = ()
    children: tuple["BlockDevice", ...] = field(default=())

    def descendants(self) -> list["BlockDevice"]:
        """Every node below this one (partitions, LVM volumes, ...), depth first."""
        out: list[BlockDevice] = []
        for child in self.children:
            out.append(child)
            out.extend(child.descendants())
        return out

    def mounts(self) -> list[tuple[str, str]]:
        """(device path, mountpoint) for this node and every node below it."""
        return [(node.path, mp) for node in [self, *self.descendants()] for mp in node.mountpoints]


def _size(value: object) -> int:
    """lsblk -b prints sizes as numbers (util-linux >= 2.33) or as strings (older)."""
    return int(value) if value not in (None, "") else 0


def parse_node(raw: dict) -> BlockDevice:
    """One lsblk JSON object (with its `children`) into a BlockDevice.

    Accepts both column sets: MOUNTPOINTS/PATH (util-linux >= 2.37) and the older MOUNTPOINT
    without PATH (Amazon Linux 2, Ubuntu 20.04)."""
    if "mountpoints" in raw:
        mounts = tuple(m for m in (raw["mountpoints"] or []) if m)
    else:
        mounts = (raw["mountpoint"],) if raw.get("mountpoint") else ()
    return BlockDevice(
        name=raw["name"], path=raw.get("path") or f"/dev/{raw['name']}", type=raw.get("type") or "",
        size=_size(raw.get("size")), model=(raw.get("model") or "").strip(),
        serial=(raw.get("serial") or "").strip(), fstype=raw.get("fstype") or None,
        mountpoints=mounts, children=tuple(parse_node(c) for c in raw.get("children") or []))


def parse_lsblk(doc: dict) -> list[BlockDevice]:
    """The top-level devices of `lsblk -J` output (a dict with key "blockdevices")."""
    if not isinstance(doc, dict) or "blockdevices" not in doc:
        raise ValueError("not lsblk JSON output: expected an object with key 'blockdevices' "
                         "(run lsblk with -J)")
    return [parse_node(raw) for raw in doc["blockdevices"]]


def natural_key(name: str) -> list:
    """Sort key so nvme2n1 comes before nvme10n1."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def describe_model(cloud: str, model: str) -> tuple[str, bool]:
    """(what the model name means on this cloud, whether it is a local drive to use)."""
    if model in CLOUD_MODELS.get(cloud, {}):
        return CLOUD_MODELS[cloud][model]
    return (f"model {model!r}" if model else "no model name", False)


def local_drives(devices: list[BlockDevice], cloud: str) -> list[BlockDevice]:
    """The cloud's local NVMe drives among the top-level disks, in natural name order."""
    found = [d for d in devices if d.type == "disk" and describe_model(cloud, d.model)[1]]
    return sorted(found, key=lambda d: natural_key(d.name))


def find_device(devices: list[BlockDevice], name_or_path: str) -> BlockDevice | None:
    """The node (at any depth) whose path or name matches, e.g. "/dev/nvme1n1" or "nvme1n1"."""
    for top in devices:
        for node in [top, *top.descendants()]:
            if name_or_path in (node.path, node.name, f"/dev/{node.name}"):
                return node
    return None


def is_root_disk(drive: BlockDevice) -> bool:
    """True when "/" is mounted from this drive or from anything built on it."""
    return any(mp == "/" for _, mp in drive.mounts())


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name of an LVM volume (hyphens doubled), as lsblk shows it."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def hard_problems(drive: BlockDevice) -> list[str]:
    """Reasons this drive may never be used, --force or not, each with its fix."""
    if is_root_disk(drive):
        return [f"{drive.path} is the root disk (/ is mounted from it); it is never erased. "
                "Pick a local NVMe drive with --devices (see lsblk)"]
    problems: list[str] = []
    if drive.type not in WHOLE_DRIVE_TYPES:
        what = "a partition" if drive.type == "part" else f"of type {drive.type!r}"
        problems.append(f"{drive.path} is {what}, not a whole drive; name the drive itself "
                        "with --devices (see lsblk)")
    for node_path, mp in drive.mounts():
        via = "" if node_path == drive.path else f" (through {node_path})"
        if mp == "[SWAP]":
            problems.append(f"{drive.path} is in use as swap{via}; run `sudo swapoff {node_path}` "
                            "first or pick another drive with --devices")
        else:
            problems.append(f"{drive.path} is mounted at {mp}{via}; unmount it first "
                            f"(sudo umount {mp}) or pick another drive with --devices")
    busy = [c for c in drive.descendants() if c.type != "part" and not c.mountpoints]
    for holder in busy:
        problems.append(f"{drive.path} is in use by {holder.type} volume {holder.name}; remove or "
                        "deactivate that volume first (for LVM: sudo vgchange -an VG, or sudo "
                        "vgremove VG to delete it) or pick another drive with --devices")
    return problems


def soft_problems(drive: BlockDevice) -> list[str]:
    """Reasons to stop unless --force: existing data that erasing would destroy."""
    problems: list[str] = []
    if drive.fstype:
        problems.append(f"{drive.path} holds existing data (signature: {drive.fstype}); "
                        "pass --force to erase it")
    parts = [c.name for c in drive.children if c.type == "part"]
    if parts:
        problems.append(f"{drive.path} has partitions ({', '.join(parts)}); "
                        "pass --force to erase them")
    return problems
