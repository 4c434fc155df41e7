"""Where bytes live and how they move: tensor handles (storage), the disk tier's files (disk_io),
the copy engine (copy_engine), the copy channels (channels), CPU attention's pinned staging
(host_stage), the tiers (tiers) and the environment that owns them all (env)."""
from flexgen_repro.devices.channels import Channel
from flexgen_repro.devices.copy_engine import CopyEngine
from flexgen_repro.devices.disk_io import DiskFile
from flexgen_repro.devices.env import ExecutionEnv
from flexgen_repro.devices.storage import RowSplit, Segment, Stored
from flexgen_repro.devices.tiers import DiskDevice, MemDevice, MixedDevice

__all__ = ["Channel", "CopyEngine", "DiskDevice", "DiskFile", "ExecutionEnv", "MemDevice",
           "MixedDevice", "RowSplit", "Segment", "Stored"]
