"""setup-nvme: plans from recorded lsblk output of AWS and GCP machines (exact commands written
out by hand from the cloud vendors' documented setup steps), every refusal, --devices, dry runs, idempotence, the
executor, the scripts, and a real run on loop devices where this machine allows it."""
from __future__ import annotations

import copy
import io
import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flexgen_repro.nvme import Options, SystemState, execute, main, plan_setup
from flexgen_repro.nvme.drives import parse_lsblk
from flexgen_repro.nvme.system import invoking_user, owner_spec, resolve_target

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
HOME_T = "/home/alice/flexllmgen_offload_dir"
ALICE = "alice:alice"


def lsblk(name: str) -> dict:
    return json.loads((DATA / f"lsblk_{name}.json").read_text())


def node(doc: dict, name: str) -> dict:
    """The raw lsblk object called `name` (at any depth), to edit a recorded tree."""
    stack = list(doc["blockdevices"])
    while stack:
        raw = stack.pop()
        if raw["name"] == name:
            return raw
        stack.extend(raw.get("children", []))
    raise KeyError(name)


def plan(doc: dict, cloud: str = "aws", is_root: bool = True, target_source: str | None = None,
         missing: frozenset[str] = frozenset(), **opts):
    state = SystemState(lsblk=doc, is_root=is_root, target_source=target_source,
                        missing_tools=missing)
    return plan_setup(state, Options(cloud=cloud, target=HOME_T, owner=ALICE, **opts))


def tail(volume: str, force: bool = False) -> list[tuple[str, ...]]:
    """The steps both clouds share once the volume exists."""
    mkfs = ("mkfs.xfs", "-f", volume) if force else ("mkfs.xfs", volume)
    return [mkfs, ("mkdir", "-p", HOME_T), ("mount", "-o", "noatime", volume, HOME_T),
            ("chown", ALICE, HOME_T)]


# --- plans from recorded lsblk output -------------------------------------------------------

def test_aws_i4i_uses_first_instance_store_drive():
    p = plan(lsblk("aws_i4i_8xlarge"))
    assert p.refusals == () and not p.already_mounted
    # two equal 3.75 TB instance-store drives: the first; the EBS root (nvme0n1) is never used
    assert list(p.commands) == tail("/dev/nvme1n1")
    assert p.drives == ("/dev/nvme1n1",)
    assert any("nvme0n1" in f and "EBS volume, not used" in f for f in p.findings)
    assert not any("loop" in f for f in p.findings)  # snap loop devices are not drives


def test_aws_p4d_old_lsblk_format_and_larger_ebs_volume_ignored():
    # util-linux 2.30: string sizes, MOUNTPOINT, no PATH; a 1.1 TB EBS data volume is larger than
    # the 1 TB instance-store drives but is not local storage
    p = plan(lsblk("aws_p4d_24xlarge_al2"))
    assert p.refusals == ()
    assert list(p.commands) == tail("/dev/nvme1n1")
    drives = {d.name: d for d in parse_lsblk(lsblk("aws_p4d_24xlarge_al2"))}
    assert drives["nvme9n1"].size == 1099511627776 and drives["nvme9n1"].mountpoints == ("/data",)
    assert drives["nvme0n1"].children[0].mountpoints == ("/",)


def test_aws_picks_the_largest_instance_store_drive():
    doc = lsblk("aws_i4i_8xlarge")
    node(doc, "nvme2n1")["size"] = 7500000000000
    assert plan(doc).drives == ("/dev/nvme2n1",)


def test_gcp_n1_stripes_over_all_local_ssds():
    p = plan(lsblk("gcp_n1_4lssd"), cloud="gcp")
    assert p.refusals == ()
    ssds = [f"/dev/nvme0n{i}" for i in range(1, 5)]
    assert list(p.commands) == [
        ("pvcreate", *ssds), ("vgcreate", "flexgen_offload", *ssds),
        ("lvcreate", "-y", "-n", "offload", "-i", "4", "-I", "1m", "-l", "100%FREE",
         "flexgen_offload"),
        *tail("/dev/flexgen_offload/offload")]
    assert any("/dev/sda" in f and "persistent disk" in f and "not used" in f for f in p.findings)


def test_gcp_c3_skips_nvme_persistent_boot_disk():
    p = plan(lsblk("gcp_c3_2lssd"), cloud="gcp")
    assert p.drives == ("/dev/nvme1n1", "/dev/nvme2n1")
    assert ("lvcreate", "-y", "-n", "offload", "-i", "2", "-I", "1m", "-l", "100%FREE",
            "flexgen_offload") in p.commands


def test_gcp_single_ssd_gets_a_plain_volume():
    doc = lsblk("gcp_c3_2lssd")
    doc["blockdevices"] = [d for d in doc["blockdevices"] if d["name"] != "nvme2n1"]
    p = plan(doc, cloud="gcp")
    assert ("lvcreate", "-y", "-n", "offload", "-l", "100%FREE", "flexgen_offload") in p.commands


def test_script_lines_are_shell_quoted():
    p = plan_setup(SystemState(lsblk("aws_i4i_8xlarge"), is_root=True),
                   Options(cloud="aws", target="/mnt/my disk/flexllmgen_offload_dir"))
    assert "mount -o noatime /dev/nvme1n1 '/mnt/my disk/flexllmgen_offload_dir'" in p.script()


# --- refusals ----------------------------------------------------------------------------------

def _mounted(doc):
    node(doc, "nvme1n1")["mountpoints"] = ["/mnt"]


def _mounted_partition(doc):
    node(doc, "nvme1n1")["children"] = [{"name": "nvme1n1p1", "path": "/dev/nvme1n1p1",
                                         "type": "part", "size": 1000, "mountpoints": ["/scratch"],
                                         "fstype": "ext4", "pkname": "nvme1n1"}]


def _swap(doc):
    node(doc, "nvme1n1").update(fstype="swap", mountpoints=["[SWAP]"])


def _has_fs(doc):
    node(doc, "nvme1n1")["fstype"] = "ext4"


def _has_partitions(doc):
    node(doc, "nvme1n1")["children"] = [{"name": "nvme1n1p1", "path": "/dev/nvme1n1p1",
                                         "type": "part", "size": 1000, "mountpoints": [None],
                                         "fstype": None, "pkname": "nvme1n1"}]


def _lvm_holder(doc):
    node(doc, "nvme1n1").update(fstype="LVM2_member", children=[
        {"name": "data-vol", "path": "/dev/mapper/data-vol", "type": "lvm", "size": 1000,
         "mountpoints": [None], "fstype": "xfs", "pkname": "nvme1n1"}])


@pytest.mark.parametrize("edit, expected, forceable", [
    (_mounted, ["/dev/nvme1n1 is mounted at /mnt", "sudo umount /mnt"], False),
    (_mounted_partition, ["mounted at /scratch (through /dev/nvme1n1p1)"], False),
    (_swap, ["in use as swap", "swapoff"], False),
    (_lvm_holder, ["in use by lvm volume data-vol", "vgchange -an"], False),
    (_has_fs, ["holds existing data (signature: ext4)", "--force"], True),
    (_has_partitions, ["has partitions (nvme1n1p1)", "--force"], True),
])
def test_unsafe_drive_is_refused(edit, expected, forceable):
    doc = lsblk("aws_i4i_8xlarge")
    edit(doc)
    p = plan(doc)
    assert p.commands == () and p.refusals
    text = " ".join(p.refusals)
    assert all(e in text for e in expected), text
    forced = plan(doc, force=True)
    if forceable:  # --force erases the signature/partition table first, and mkfs gets -f
        assert forced.refusals == ()
        assert list(forced.commands) == [("wipefs", "-a", "/dev/nvme1n1"),
                                         *tail("/dev/nvme1n1", force=True)]
    else:  # still refused for the same reason; only the "holds data" part is forgiven
        assert forced.commands == () and not any("--force" in r for r in forced.refusals)
        assert all(e in " ".join(forced.refusals) for e in expected)


@pytest.mark.parametrize("cloud, doc, device", [("aws", "aws_i4i_8xlarge", "nvme0n1"),
                                                ("gcp", "gcp_n1_4lssd", "/dev/sda"),
                                                ("gcp", "gcp_c3_2lssd", "nvme0n1")])
def test_root_disk_is_refused_even_with_force(cloud, doc, device):
    p = plan(lsblk(doc), cloud=cloud, devices=(device,), force=True)
    assert p.commands == ()
    assert any("is the root disk" in r for r in p.refusals), p.refusals


def test_partition_named_instead_of_drive_is_refused():
    p = plan(lsblk("aws_i4i_8xlarge"), devices=("/dev/nvme0n1p14",))
    assert any("is a partition, not a whole drive" in r for r in p.refusals)


def test_no_local_drives_found():
    for cloud, doc in [("aws", "gcp_n1_4lssd"), ("gcp", "aws_i4i_8xlarge")]:
        p = plan(lsblk(doc), cloud=cloud)
        assert p.commands == () and len(p.refusals) == 1
        assert "no local NVMe drives found" in p.refusals[0] and "--devices" in p.refusals[0]
    assert "Amazon Elastic Block Store" in plan(lsblk("aws_i4i_8xlarge"), cloud="gcp").refusals[0]


def test_unknown_cloud():
    p = plan(lsblk("aws_i4i_8xlarge"), cloud="azure")
    assert p.commands == () and "unknown cloud 'azure'" in p.refusals[0] and "aws" in p.refusals[0]
    err = io.StringIO()
    assert main("azure", dry_run=True, err=err) == 2 and "choose one of aws, gcp" in err.getvalue()


def test_needs_root_unless_dry_run():
    p = plan(lsblk("aws_i4i_8xlarge"), is_root=False)
    assert p.commands == () and any("needs root" in r and "sudo" in r for r in p.refusals)
    dry = plan(lsblk("aws_i4i_8xlarge"), is_root=False, dry_run=True)
    assert dry.refusals == () and list(dry.commands) == tail("/dev/nvme1n1")


def test_missing_tools_name_their_package():
    p = plan(lsblk("gcp_n1_4lssd"), cloud="gcp", missing=frozenset({"lvcreate", "mkfs.xfs"}))
    text = " ".join(p.refusals)
    assert "lvcreate is not installed; install lvm2" in text and "install xfsprogs" in text
    dry = plan(lsblk("gcp_n1_4lssd"), cloud="gcp", missing=frozenset({"mkfs.xfs"}), dry_run=True)
    assert dry.refusals == () and any("mkfs.xfs is not installed" in u for u in dry.unchecked)


# --- --devices and dry runs --------------------------------------------------------------------

def test_devices_override_detection():
    p = plan(lsblk("aws_i4i_8xlarge"), devices=("nvme2n1",))
    assert list(p.commands) == tail("/dev/nvme2n1")
    p = plan(lsblk("gcp_n1_4lssd"), cloud="gcp", devices=("/dev/nvme0n3", "/dev/nvme0n1"))
    assert ("pvcreate", "/dev/nvme0n3", "/dev/nvme0n1") in p.commands
    assert ("lvcreate", "-y", "-n", "offload", "-i", "2", "-I", "1m", "-l", "100%FREE",
            "flexgen_offload") in p.commands
    ebs = plan(lsblk("aws_p4d_24xlarge_al2"), devices=("/dev/nvme9n1",))  # mounted at /data
    assert any("mounted at /data" in r for r in ebs.refusals)


def test_devices_misuse_is_refused():
    twice = plan(lsblk("gcp_n1_4lssd"), cloud="gcp", devices=("nvme0n1", "/dev/nvme0n1"))
    assert any("named twice" in r for r in twice.refusals)
    two_on_aws = plan(lsblk("aws_i4i_8xlarge"), devices=("nvme1n1", "nvme2n1"))
    assert any("uses one drive" in r for r in two_on_aws.refusals)
    absent = plan(lsblk("aws_i4i_8xlarge"), devices=("/dev/nvme7n1",))
    assert absent.commands == () and any("/dev/nvme7n1 not found" in r for r in absent.refusals)


def test_dry_run_with_absent_devices_prints_commands_and_the_checks_not_made():
    p = plan(lsblk("gcp_n1_4lssd"), cloud="gcp", is_root=False, dry_run=True,
             devices=("/dev/nvme5n1", "/dev/nvme6n1"))
    assert p.refusals == ()
    assert p.commands[0] == ("pvcreate", "/dev/nvme5n1", "/dev/nvme6n1")
    assert len(p.unchecked) == 2
    assert all("not present" in u and "root disk" in u for u in p.unchecked)


def test_main_dry_run_on_this_machine(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = main("gcp", mount_path=str(tmp_path / "a b"), devices="/dev/nvme96n1,/dev/nvme97n1",
                dry_run=True, out=out, err=err)
    assert code == 0, err.getvalue()
    target = tmp_path / "a b" / "flexllmgen_offload_dir"
    lines = out.getvalue().splitlines()
    assert "mkfs.xfs /dev/flexgen_offload/offload" in lines
    assert f"mount -o noatime /dev/flexgen_offload/offload '{target}'" in lines
    assert sum("not checked: /dev/nvme9" in line for line in lines) == 2
    assert not target.exists()  # nothing changed


def test_main_as_a_normal_user(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: pwd.getpwnam("nobody").pw_uid)
    monkeypatch.delenv("SUDO_USER", raising=False)
    err = io.StringIO()
    assert main("aws", str(tmp_path), "/dev/nvme95n1", out=io.StringIO(), err=err) == 2
    assert "needs root" in err.getvalue() and "/dev/nvme95n1 not found" in err.getvalue()
    out = io.StringIO()
    assert main("aws", str(tmp_path), "/dev/nvme95n1", dry_run=True, out=out) == 0
    assert "blkid needs root" in out.getvalue()
    assert f"chown nobody:{owner_spec(pwd.getpwnam('nobody')).split(':')[1]}" in out.getvalue()


# --- idempotence -------------------------------------------------------------------------------

def test_gcp_already_set_up_is_reported():
    p = plan(lsblk("gcp_n1_4lssd_after_setup"), cloud="gcp", is_root=False)
    assert p.already_mounted and p.commands == () and p.refusals == ()
    assert any("already mounted from /dev/flexgen_offload/offload" in f for f in p.findings)


def test_aws_already_set_up_is_reported():
    doc = lsblk("aws_i4i_8xlarge")
    node(doc, "nvme1n1").update(fstype="xfs", mountpoints=[HOME_T])
    p = plan(doc)
    assert p.already_mounted and p.commands == () and p.refusals == ()


def test_target_mounted_from_something_else_is_refused():
    p = plan(lsblk("aws_i4i_8xlarge"), target_source="tmpfs")
    assert not p.already_mounted and p.commands == ()
    assert any("already a mount point (of tmpfs)" in r and "umount" in r for r in p.refusals)


def test_gcp_volume_not_spanning_a_new_drive_is_refused():
    doc = lsblk("gcp_n1_4lssd_after_setup")
    doc["blockdevices"].append(copy.deepcopy(lsblk("gcp_n1_4lssd")["blockdevices"][1]))
    doc["blockdevices"][-1].update(name="nvme0n5", path="/dev/nvme0n5")
    p = plan(doc, cloud="gcp")
    assert not p.already_mounted and any("does not span /dev/nvme0n5" in r for r in p.refusals)


# --- helpers: target, owner, executor, scripts ---------------------------------------------------

def test_target_resolution(tmp_path):
    assert resolve_target("~", "/home/alice") == HOME_T
    assert resolve_target("~/x/", "/home/alice") == "/home/alice/x/flexllmgen_offload_dir"
    assert resolve_target(str(tmp_path) + "/", "/h") == str(tmp_path / "flexllmgen_offload_dir")


def test_owner_is_sudo_user(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("SUDO_USER", "nobody")
    user = invoking_user()
    assert user.pw_name == "nobody" and owner_spec(user).startswith("nobody:")
    monkeypatch.delenv("SUDO_USER")
    assert invoking_user().pw_uid == 0


def test_executor_stops_at_first_failure_with_its_stderr(tmp_path):
    never = tmp_path / "never"
    out, err = io.StringIO(), io.StringIO()
    code = execute((("true",), ("sh", "-c", "echo disk on fire >&2; exit 3"),
                    ("touch", str(never))), out=out, err=err)
    assert code == 1 and not never.exists()
    assert "command failed: sh -c 'echo disk on fire >&2; exit 3'" in err.getvalue()
    assert "exit 3: disk on fire" in err.getvalue() and "already done before it" in err.getvalue()
    assert out.getvalue().splitlines()[0] == "+ true"
    missing = execute((("no-such-tool-xyz",),), out=out, err=err)
    assert missing == 1 and "no-such-tool-xyz is not installed" in err.getvalue()


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_scripts_call_the_same_code(cloud, tmp_path):
    script = REPO / "scripts" / f"mount_nvme_{cloud}.sh"
    res = subprocess.run(["bash", str(script), str(tmp_path), "--dry-run", "--devices",
                          "/dev/nvme98n1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    volume = "/dev/nvme98n1" if cloud == "aws" else "/dev/flexgen_offload/offload"
    assert f"mkfs.xfs {volume}" in res.stdout.splitlines()
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr


# --- a real run on loop devices ----------------------------------------------------------------

def _sh(*cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin",
               LVM_SUPPRESS_FD_WARNINGS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def loops(tmp_path):
    """Two 512 MB loop devices (xfs needs 300 MB); everything set up on them is torn down."""
    if os.geteuid() != 0:
        pytest.skip("the real run needs root (losetup, mkfs.xfs, mount)")
    for tool in ("losetup", "mkfs.xfs", "mount", "findmnt"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} is not installed (util-linux / xfsprogs)")
    rig = {"devices": [], "mounts": [], "vgs": []}
    try:
        for i in range(2):
            img = tmp_path / f"drive{i}.img"
            with open(img, "wb") as f:
                f.truncate(512 * 1024**2)
            res = _sh("losetup", "--find", "--show", str(img))
            if res.returncode != 0:
                pytest.skip(f"losetup cannot attach a loop device here: {res.stderr.strip()}")
            rig["devices"].append(res.stdout.strip())
        yield rig
    finally:
        for target in rig["mounts"]:
            if os.path.ismount(target):
                _sh("umount", target)
        for vg in rig["vgs"]:
            _sh("vgremove", "-f", "-y", vg)
        for dev in rig["devices"]:
            if rig["vgs"]:
                _sh("pvremove", "-ff", "-y", dev)
            _sh("losetup", "-d", dev)


def _findmnt(target: Path, column: str) -> str:
    return _sh("findmnt", "-n", "-o", column, "--mountpoint", str(target)).stdout.strip()


def test_real_aws_setup_on_a_loop_device(loops, tmp_path):
    first, second = loops["devices"]
    home = tmp_path / "home"
    target = home / "flexllmgen_offload_dir"
    loops["mounts"] += [str(target), str(tmp_path / "other" / "flexllmgen_offload_dir")]
    out, err = io.StringIO(), io.StringIO()
    assert main("aws", str(home), first, out=out, err=err) == 0, err.getvalue()
    assert os.path.ismount(target) and _findmnt(target, "FSTYPE") == "xfs"
    assert _findmnt(target, "SOURCE") == first
    assert target.stat().st_uid == invoking_user().pw_uid
    (target / "probe").write_bytes(b"offload")
    # idempotent: the second run reports the mount and runs nothing
    out, err = io.StringIO(), io.StringIO()
    assert main("aws", str(home), first, out=out, err=err) == 0, err.getvalue()
    assert "nothing to do" in out.getvalue() and "+ " not in out.getvalue()
    # the mounted drive may not be reused elsewhere, even with --force
    err = io.StringIO()
    assert main("aws", str(tmp_path / "other"), first, force=True, err=err, out=io.StringIO()) == 2
    assert f"is mounted at {target}" in err.getvalue()
    # a drive holding a filesystem (found by blkid even where lsblk has no udev) needs --force
    assert _sh("mkfs.xfs", "-q", second).returncode == 0
    err = io.StringIO()
    assert main("aws", str(tmp_path / "other"), second, err=err, out=io.StringIO()) == 2
    assert "holds existing data (signature: xfs)" in err.getvalue()
    assert "--force" in err.getvalue()
    out = io.StringIO()
    assert main("aws", str(tmp_path / "other"), second, force=True, out=out) == 0
    assert f"+ wipefs -a {second}" in out.getvalue()
    assert _findmnt(tmp_path / "other" / "flexllmgen_offload_dir", "SOURCE") == second


def test_real_gcp_setup_on_loop_devices(loops, tmp_path):
    if shutil.which("pvcreate", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("pvcreate is not installed (lvm2)")
    vg = f"fgtest_{uuid.uuid4().hex[:8]}"
    loops["vgs"].append(vg)
    home = tmp_path / "home"
    target = home / "flexllmgen_offload_dir"
    loops["mounts"].append(str(target))
    out, err = io.StringIO(), io.StringIO()
    devices = ",".join(loops["devices"])
    code = main("gcp", str(home), devices, vg_name=vg, out=out, err=err)
    pvs = _sh("vgs", "--noheadings", "-o", "pv_count", vg).stdout.strip()
    assert pvs == "2", (out.getvalue(), err.getvalue())  # pvcreate + vgcreate really ran
    if "device-mapper" not in Path("/proc/misc").read_text():
        assert code == 1 and "command failed: lvcreate" in err.getvalue()
        assert "device-mapper" in err.getvalue()
        # the half-built drives are LVM members now: a rerun refuses them; --force rebuilds
        err = io.StringIO()
        assert main("gcp", str(home), devices, vg_name=vg, out=io.StringIO(), err=err) == 2
        assert "(signature: LVM2_member)" in err.getvalue()
        out, err = io.StringIO(), io.StringIO()
        assert main("gcp", str(home), devices, vg_name=vg, force=True, out=out, err=err) == 1
        assert f"+ vgcreate {vg}" in out.getvalue() and "command failed: lvcreate" in err.getvalue()
        pytest.skip("no device-mapper in this kernel (not in /proc/misc): pvcreate, vgcreate, "
                    "the refusal of half-built drives and the --force rebuild were checked up to "
                    "lvcreate, which fails here; the striped volume, its mkfs.xfs and mount "
                    "were not exercised")
    assert code == 0, err.getvalue()
    stripes = _sh("lvs", "--noheadings", "--units", "b", "--nosuffix", "-o",
                  "stripes,stripe_size", f"{vg}/offload").stdout.split()
    assert stripes == ["2", str(1024**2)]  # -i 2 -I 1m
    assert os.path.ismount(target) and _findmnt(target, "FSTYPE") == "xfs"
    out = io.StringIO()
    assert main("gcp", str(home), devices, vg_name=vg, out=out) == 0
    assert "nothing to do" in out.getvalue()


@pytest.mark.parametrize("cloud,doc,first", [
    ("aws", "gcp_n1_4lssd", ("mkfs.xfs", "/dev/nvme1n1")),
    ("gcp", "aws_i4i_8xlarge", ("pvcreate", "/dev/disk/by-id/google-local-nvme-ssd-0",
                                "/dev/disk/by-id/google-local-nvme-ssd-1"))])
def test_dry_run_without_local_drives_prints_the_plan_and_the_checks_not_made(cloud, doc, first):
    """The help promises a dry run anywhere: without the drives it plans for stand-ins, names them
    and the checks it could not make, and refuses nothing."""
    p = plan(lsblk(doc), cloud=cloud, is_root=False, dry_run=True)
    assert p.refusals == () and p.commands[0] == first
    assert p.commands[-2][0] == "mount" and p.commands[-1] == ("chown", ALICE, HOME_T)
    (note,) = p.unchecked
    assert "no local NVMe drives here" in note and "not the root disk" in note


def test_invoke_dry_run_on_a_machine_without_the_drives(tmp_path):
    """`invoke setup-nvme --cloud aws --dry-run` as a user types it, here (no instance store)."""
    done = subprocess.run([sys.executable, "-m", "invoke", "setup-nvme", "--cloud", "aws",
                           "--dry-run", "--mount-path", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "# not checked: " in done.stdout and "these commands would run" in done.stdout
    assert f"mount -o noatime /dev/nvme1n1 {tmp_path}/flexllmgen_offload_dir" in done.stdout
    assert not (tmp_path / "flexllmgen_offload_dir").exists()
