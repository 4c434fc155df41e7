"""flexgen_repro: high-throughput OPT inference on one memory-limited GPU (a FlexGen reproduction)."""
from flexgen_repro.config import OptConfig, get_opt_config
from flexgen_repro.policy import CompressionConfig, Policy

__all__ = ["CompressionConfig", "Policy", "OptConfig", "get_opt_config", "ExecutionEnv", "OptLM"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "ExecutionEnv":
        from flexgen_repro.devices.env import ExecutionEnv
        return ExecutionEnv
    if name == "OptLM":
        from flexgen_repro.opt_lm import OptLM
        return OptLM
    raise AttributeError(f"module 'flexgen_repro' has no attribute {name!r}")
