"""flexgen_repro: high-throughput OPT inference on one memory-limited GPU (a FlexGen reproduction)."""
from flexgen_repro.config import OptConfig, get_opt_config
from flexgen_repro.policy import CompressionConfig, Policy

__all__ = ["CompressionConfig", "Policy", "OptConfig", "get_opt_config", "ExecutionEnv", "OptLM", "LLM",
           "Completion"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "ExecutionEnv":
        from flexgen_repro.devices.env import ExecutionEnv
        return ExecutionEnv
    if name == "OptLM":
        from flexgen_repro.opt_lm import OptLM
        return OptLM
    if name in ("LLM", "Completion"):
        from flexgen_repro import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'flexgen_repro' has no attribute {name!r}")
