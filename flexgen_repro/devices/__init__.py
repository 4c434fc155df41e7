"""Storage tiers: GPU, CPU, disk and mixed devices, tensor handles and copy channels."""
from flexgen_repro.devices.env import Channel, DiskDevice, ExecutionEnv, MemDevice, MixedDevice
from flexgen_repro.devices.storage import DiskFile, RowSplit, Segment, Stored

__all__ = ["Channel", "DiskDevice", "DiskFile", "ExecutionEnv", "MemDevice", "MixedDevice",
           "RowSplit", "Segment", "Stored"]
