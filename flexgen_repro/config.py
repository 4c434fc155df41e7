"""What a model is: OptConfig, the OPT preset table, and reading a Hugging Face `config.json`.

No torch devices here; sizes are counted in bytes of the configured dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

# name -> (num_hidden_layers, n_head, hidden_size, ffn_embed_dim)
OPT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    # not a released model: a CPU-sized shape for the smoke suite and tests (dummy weights only)
    "opt-tiny": (2, 4, 64, 256),
    "opt-125m": (12, 12, 768, 3072),
    "opt-350m": (24, 16, 1024, 4096),
    "opt-1.3b": (24, 32, 2048, 8192),
    "opt-2.7b": (32, 32, 2560, 10240),
    "opt-6.7b": (32, 32, 4096, 16384),
    "opt-13b": (40, 40, 5120, 20480),
    "opt-30b": (48, 56, 7168, 28672),
    "opt-66b": (64, 72, 9216, 36864),
    "opt-175b": (96, 96, 12288, 49152),
}
# instruction-tuned variants share the base sizes
OPT_PRESETS.update({
    "opt-iml-1.3b": OPT_PRESETS["opt-1.3b"],
    "opt-iml-max-1.3b": OPT_PRESETS["opt-1.3b"],
    "opt-iml-30b": OPT_PRESETS["opt-30b"],
    "opt-iml-max-30b": OPT_PRESETS["opt-30b"],
})

_DTYPES = {
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "bfloat16": "bfloat16",
}
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def normalize_dtype(dtype) -> np.dtype | str:
    """np.float16 / "float16" / torch.float16 / "bfloat16" ... -> np.dtype, or "bfloat16"."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype) -> str:
    d = normalize_dtype(dtype)
    return d if isinstance(d, str) else d.name


@dataclass(frozen=True)
class OptConfig:
    name: str = "opt-125m"
    num_hidden_layers: int = 12
    n_head: int = 12
    hidden_size: int = 768
    input_dim: int = 768
    ffn_embed_dim: int = 3072
    max_seq_len: int = 2048
    vocab_size: int = 50272
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    dtype: object = np.float16
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        for field in ("num_hidden_layers", "n_head", "hidden_size", "ffn_embed_dim",
                      "max_seq_len", "vocab_size"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"OptConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.hidden_size % self.n_head:
            raise ValueError(f"OptConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"n_head ({self.n_head})")

    @property
    def family(self) -> str:
        """The model family (which layers the runtime builds): "opt"."""
        return "opt"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def n_kv_head(self) -> int:
        """Key/value heads: the KV cache holds (batch, n_kv_head, seq, head_dim) per layer."""
        return self.n_head

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[dtype_name(self.dtype)]

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, dtype_name(self.dtype))

    def layer_params(self) -> int:
        """Parameters of one transformer layer (attention + MLP, with biases and layer norms)."""
        h, f = self.hidden_size, self.ffn_embed_dim
        return 4 * h * h + 4 * h + 2 * h + 2 * h * f + f + h + 2 * h

    def embed_params(self) -> int:
        """Token and position embeddings (the output projection is tied) and the final layer norm."""
        h = self.hidden_size
        return self.vocab_size * h + (self.max_seq_len + 2) * h + 2 * h

    def num_params(self) -> int:
        return self.num_hidden_layers * self.layer_params() + self.embed_params()

    def model_bytes(self) -> int:
        return self.num_params() * self.dtype_bytes

    def cache_bytes(self, batch_size: int, seq_len: int) -> int:
        """Key and value cache of every layer for `batch_size` sequences of `seq_len` tokens."""
        return 2 * batch_size * seq_len * self.num_hidden_layers * self.hidden_size * self.dtype_bytes

    def hidden_bytes(self, batch_size: int, seq_len: int) -> int:
        return batch_size * seq_len * self.hidden_size * self.dtype_bytes


def canonical_name(name: str) -> str:
    """"facebook/opt-1.3b", "OPT-1.3B", "opt-1.3b" -> "opt-1.3b"."""
    return name.split("/")[-1].lower()


def _from_hf_config(path: str, **overrides) -> OptConfig:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type", "opt") != "opt":
        raise ValueError(f"{path}/config.json describes a {cfg.get('model_type')!r} model; "
                         "only OPT checkpoints are supported")
    hidden = cfg["hidden_size"]
    if cfg.get("word_embed_proj_dim", hidden) != hidden or not cfg.get("do_layer_norm_before", True):
        raise ValueError(f"{path}: OPT variants with a projected embedding or post-layer-norm "
                         "(opt-350m) are not supported")
    if cfg.get("activation_function", "relu") != "relu":
        raise ValueError(f"{path}: activation {cfg['activation_function']!r} is not supported (relu only)")
    fields = dict(
        name=os.path.basename(os.path.normpath(path)),
        num_hidden_layers=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
        hidden_size=hidden, input_dim=hidden, ffn_embed_dim=cfg["ffn_dim"],
        max_seq_len=cfg.get("max_position_embeddings", 2048), vocab_size=cfg["vocab_size"],
        pad_token_id=cfg.get("pad_token_id", 1), bos_token_id=cfg.get("bos_token_id", 2),
        eos_token_id=cfg.get("eos_token_id", 2))
    fields.update(overrides)
    return OptConfig(**fields)


def get_opt_config(name_or_dir: str, **overrides) -> OptConfig:
    """OptConfig for a preset name ("facebook/opt-6.7b", "opt-6.7b") or a local HF checkpoint folder."""
    if os.path.isdir(name_or_dir) and os.path.exists(os.path.join(name_or_dir, "config.json")):
        return _from_hf_config(name_or_dir, **overrides)
    name = canonical_name(name_or_dir)
    if name not in OPT_PRESETS:
        supported = sorted(n for n in OPT_PRESETS if n != "opt-350m")
        raise ValueError(f"unknown model {name_or_dir!r}: choose one of {supported}, "
                         "or pass a local Hugging Face checkpoint folder holding config.json")
    if name == "opt-350m":
        raise ValueError("opt-350m (projected embedding, post-layer-norm) is not supported; "
                         "use opt-125m or opt-1.3b")
    layers, heads, hidden, ffn = OPT_PRESETS[name]
    fields = dict(name=name, num_hidden_layers=layers, n_head=heads, hidden_size=hidden,
                  input_dim=hidden, ffn_embed_dim=ffn)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(OptConfig)}
    if unknown:
        raise ValueError(f"unknown OptConfig fields {sorted(unknown)}")
    fields.update(overrides)
    return OptConfig(**fields)
