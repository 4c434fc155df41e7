"""The generation driver: one block of gpu_batch_size x num_gpu_batches prompts through the
paper's Algorithm 1 (driver.py), with the ordering of its steps as strategies (strategies.py)
over the steps themselves (steps.py)."""
from flexgen_repro.policy import whole_copies
from flexgen_repro.schedule.driver import BlockRun, generate_block
from flexgen_repro.schedule.steps import MAX_PENDING_STORES, BlockSteps
from flexgen_repro.schedule.strategies import (GraphedPipeline, NoOverlap,
                                               OverlapBatches, OverlapOneBatch, layer_strategy)

__all__ = ["BlockRun", "BlockSteps", "GraphedPipeline", "MAX_PENDING_STORES", "NoOverlap",
           "OverlapBatches", "OverlapOneBatch", "generate_block",
           "layer_strategy", "whole_copies"]
