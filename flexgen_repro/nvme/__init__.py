"""Local NVMe setup for the disk offload tier (`invoke setup-nvme`, scripts/mount_nvme_*.sh).

drives.py reads lsblk's JSON and says which drives are local and safe to erase; plan.py turns
that and the options into the exact commands (pure, unit tested on recorded lsblk output);
system.py gathers the machine's state and runs the commands; cli.py is `main()` and the
`python -m flexgen_repro.nvme` parser."""
from flexgen_repro.nvme.cli import main
from flexgen_repro.nvme.plan import Options, Plan, SystemState, plan_setup
from flexgen_repro.nvme.system import execute, gather_state

__all__ = ["main", "plan_setup", "Options", "Plan", "SystemState", "execute", "gather_state"]
