"""Weight folders: names and shapes, Hugging Face and metaseq conversion, manifests, dummy weights."""
from flexgen_repro.weights.layout import expected_tensors, layer_tensor_names, weight_dir

__all__ = ["expected_tensors", "layer_tensor_names", "weight_dir", "convert_metaseq_shards"]


def __getattr__(name):
    if name == "convert_metaseq_shards":
        from flexgen_repro.weights.metaseq import convert_metaseq_shards
        return convert_metaseq_shards
    raise AttributeError(name)
