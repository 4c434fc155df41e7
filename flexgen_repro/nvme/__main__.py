"""`python -m flexgen_repro.nvme --cloud aws|gcp ...`: see flexgen_repro.nvme.cli."""
import sys

from flexgen_repro.nvme.cli import cli

sys.exit(cli())
