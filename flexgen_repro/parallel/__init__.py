"""More than one GPU on torch.distributed: pipeline parallelism over layer ranges (world.py,
link.py, stage.py, pipeline.py; `python -m flexgen_repro.dist_flex_opt`) and data parallelism
for the text job (shards.py; `torchrun ... -m flexgen_repro.generate`)."""
