"""flexgen_repro: high-throughput LLM inference on one memory-limited GPU (a FlexGen reproduction)."""
from flexgen_repro.config import LlamaConfig, OptConfig, get_model_config, get_opt_config
from flexgen_repro.policy import CompressionConfig, Policy

__all__ = ["CompressionConfig", "Policy", "OptConfig", "LlamaConfig", "get_opt_config", "get_model_config",
           "ExecutionEnv", "OptLM", "CausalLM", "LLM", "Completion"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "ExecutionEnv":
        from flexgen_repro.devices.env import ExecutionEnv
        return ExecutionEnv
    if name in ("OptLM", "CausalLM"):  # CausalLM: the same class, a family-neutral name
        from flexgen_repro.opt_lm import OptLM
        return OptLM
    if name in ("LLM", "Completion"):
        from flexgen_repro import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'flexgen_repro' has no attribute {name!r}")
