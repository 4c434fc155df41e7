"""What a model is: OptConfig and LlamaConfig, their preset tables, and reading a Hugging Face
`config.json` (`get_model_config` picks the family from its `model_type`).

No torch devices here; sizes are counted in bytes of the configured dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

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


class ModelSizes:
    """Size helpers shared by every family's config; each family defines `layer_params()`,
    `embed_params()`, `kv_size` (keys of one token in one layer: KV heads x head width),
    `num_hidden_layers`, `hidden_size` and `dtype_bytes`."""

    def num_params(self) -> int:
        return self.num_hidden_layers * self.layer_params() + self.embed_params()

    def model_bytes(self) -> int:
        return self.num_params() * self.dtype_bytes

    def cache_bytes(self, batch_size: int, seq_len: int) -> int:
        """Key and value cache of every layer for `batch_size` sequences of `seq_len` tokens (per
        KV head, not per query head)."""
        return 2 * batch_size * seq_len * self.num_hidden_layers * self.kv_size * self.dtype_bytes

    def hidden_bytes(self, batch_size: int, seq_len: int) -> int:
        return batch_size * seq_len * self.hidden_size * self.dtype_bytes


@dataclass(frozen=True)
class OptConfig(ModelSizes):
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
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (one for OPT)."""
        return () if self.eos_token_id is None else (self.eos_token_id,)

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

    @property
    def kv_size(self) -> int:
        """Width of one token's keys (or values) in a layer: every head is a KV head in OPT."""
        return self.n_kv_head * self.head_dim


def canonical_name(name: str) -> str:
    """"facebook/opt-1.3b", "OPT-1.3B", "opt-1.3b" -> "opt-1.3b"."""
    return name.split("/")[-1].lower()


def _from_hf_config(path: str, **overrides) -> OptConfig:
    cfg = _read_config_json(path)
    if cfg.get("model_type", "opt") != "opt":
        raise ValueError(f"{path}/config.json describes a {cfg.get('model_type')!r} model: only OPT "
                         "checkpoints are read here; use flexgen_repro.config.get_model_config for "
                         "other families")
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


def _read_config_json(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


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


def is_checkpoint_dir(path: str) -> bool:
    """A local Hugging Face checkpoint folder (it holds config.json)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def get_model_config(name_or_dir: str, **overrides):
    """OptConfig or LlamaConfig for a preset name of any family or a local HF checkpoint folder
    (the family comes from its config.json's `model_type`)."""
    if is_checkpoint_dir(name_or_dir):
        model_type = _read_config_json(name_or_dir).get("model_type", "opt")
        if model_type == "opt":
            return _from_hf_config(name_or_dir, **overrides)
        if model_type in LLAMA_MODEL_TYPES:
            return llama_from_hf(name_or_dir, **overrides)
        raise ValueError(f"{name_or_dir}/config.json describes a {model_type!r} model; supported "
                         f"model types: {['opt', *LLAMA_MODEL_TYPES]}")
    name = canonical_name(name_or_dir)
    if name in LLAMA_PRESETS:
        return llama_preset(name, **overrides)
    if name in OPT_PRESETS:
        return get_opt_config(name, **overrides)
    known = sorted(n for n in OPT_PRESETS if n != "opt-350m") + sorted(LLAMA_PRESETS)
    raise ValueError(f"unknown model {name_or_dir!r}: choose one of {known}, "
                     "or pass a local Hugging Face checkpoint folder holding config.json")


# ---- the Llama family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) -------------------

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """A checkpoint's `rope_scaling` / `rope_parameters` (transformers' names and defaults); the
    maths is in model/rope.py. `original_max_position_embeddings` defaults to the model's
    max_position_embeddings, as transformers does."""
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0        # llama3
    high_freq_factor: float = 4.0       # llama3
    attention_factor: float | None = None  # yarn
    beta_fast: float = 32.0             # yarn
    beta_slow: float = 1.0              # yarn
    mscale: float | None = None         # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True               # yarn

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; "
                             f"choose one of {list(ROPE_TYPES)}")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling factor must be > 0, got {self.factor}")

    @classmethod
    def from_hf(cls, params: dict | None, max_position_embeddings: int) -> "RopeScaling | None":
        """From config.json's dict (`type` or `rope_type`); None for plain rotary embeddings."""
        if not params:
            return None
        params = dict(params)
        rope_type = params.pop("rope_type", None) or params.pop("type", "default")
        params.pop("type", None)
        params.pop("rope_theta", None)
        if rope_type == "default":
            return None
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"rope_scaling keys {sorted(unknown)} are not supported (known: {sorted(known)})")
        params = {k: v for k, v in params.items() if v is not None or k in ("attention_factor", "mscale",
                                                                             "mscale_all_dim")}
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
        if rope_type == "dynamic":  # transformers scales from max_position_embeddings here
            params["original_max_position_embeddings"] = max_position_embeddings
        return cls(rope_type=rope_type, **params)


@dataclass(frozen=True)
class LlamaConfig(ModelSizes):
    """A Llama-family model: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.
    Mistral (sliding window) and Qwen2 (q/k/v biases) are the same family with flags."""
    name: str = "llama-tiny"
    num_hidden_layers: int = 2
    n_head: int = 4
    n_kv_head: int = 4
    hidden_size: int = 64
    intermediate_size: int = 176
    max_seq_len: int = 2048
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False         # q, k, v projections have biases (Qwen2; Llama's flag)
    attention_out_bias: bool = False     # the output projection has a bias (Llama's flag only)
    sliding_window: int | None = None    # Mistral: a token attends to the last `sliding_window`
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    dtype: object = np.float16
    head_dim: int = 0                    # 0: hidden_size // n_head
    model_type: str = "llama"            # the checkpoint's: "llama", "mistral" or "qwen2"
    family: str = field(default="llama", init=False)

    def __post_init__(self):
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // max(1, self.n_head))
        for name in ("num_hidden_layers", "n_head", "n_kv_head", "hidden_size", "intermediate_size",
                     "max_seq_len", "vocab_size", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig.n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"LlamaConfig.sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.model_type not in LLAMA_MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type must be one of {list(LLAMA_MODEL_TYPES)}")

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (None when the checkpoint names none)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[dtype_name(self.dtype)]

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, dtype_name(self.dtype))

    @property
    def q_size(self) -> int:
        """Width of the queries (n_head * head_dim; may differ from hidden_size)."""
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the keys and of the values (n_kv_head * head_dim)."""
        return self.n_kv_head * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one layer: q, k, v, o projections (with their biases), SwiGLU, two RMSNorms."""
        h, f, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        attn = 2 * h * q + 2 * h * kv + (q + 2 * kv) * self.attention_bias + h * self.attention_out_bias
        return attn + 3 * h * f + 2 * h

    def embed_params(self) -> int:
        """Token embedding, final RMSNorm, and the output projection when it is not tied."""
        h = self.hidden_size
        return self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h



# name -> LlamaConfig fields (shapes of the released checkpoints; "-tiny" ones are CPU-sized
# shapes for dummy-weight smoke runs and tests, not released models)
LLAMA_PRESETS: dict[str, dict] = {
    "llama-tiny": dict(num_hidden_layers=2, n_head=4, n_kv_head=4, hidden_size=64, intermediate_size=176),
    "llama-tiny-gqa": dict(num_hidden_layers=2, n_head=4, n_kv_head=2, hidden_size=64, intermediate_size=176),
    "llama-2-7b": dict(num_hidden_layers=32, n_head=32, n_kv_head=32, hidden_size=4096,
                       intermediate_size=11008, max_seq_len=4096),
    "llama-2-70b": dict(num_hidden_layers=80, n_head=64, n_kv_head=8, hidden_size=8192,
                        intermediate_size=28672, max_seq_len=4096),
    "mistral-7b": dict(num_hidden_layers=32, n_head=32, n_kv_head=8, hidden_size=4096,
                       intermediate_size=14336, max_seq_len=32768, sliding_window=4096,
                       model_type="mistral"),
    "smollm2-135m-instruct": dict(num_hidden_layers=30, n_head=9, n_kv_head=3, hidden_size=576,
                                  intermediate_size=1536, max_seq_len=8192, vocab_size=49152,
                                  rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2,
                                  bos_token_id=1, eos_token_ids=(2,)),
}


def llama_preset(name: str, **overrides) -> LlamaConfig:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig) if f.init}
    if unknown:
        raise ValueError(f"unknown LlamaConfig fields {sorted(unknown)}")
    return LlamaConfig(**{"name": name, **LLAMA_PRESETS[name], **overrides})


def _llama_fields(cfg: dict, path: str) -> dict:
    """LlamaConfig fields from a llama / mistral / qwen2 config.json."""
    model_type = cfg["model_type"]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{path}: hidden_act {act!r} is not supported (silu only)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{path}: MLP biases (mlp_bias) are not supported")
    heads = cfg["num_attention_heads"]
    window = cfg.get("sliding_window") if model_type == "mistral" else None
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError(f"{path}: Qwen2's per-layer sliding window (use_sliding_window) is not supported")
    bias = bool(cfg.get("attention_bias", False))
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    pad = cfg.get("pad_token_id")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    max_pos = cfg.get("max_position_embeddings", 2048)
    scaling = RopeScaling.from_hf(rope, max_pos)
    # dynamic NTK scaling stretches the trained positions by `factor` at run time
    max_len = int(max_pos * scaling.factor) if scaling and scaling.rope_type == "dynamic" else max_pos
    return dict(
        name=os.path.basename(os.path.normpath(path)), model_type=model_type,
        num_hidden_layers=cfg["num_hidden_layers"], n_head=heads,
        n_kv_head=cfg.get("num_key_value_heads") or heads, hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], max_seq_len=max_len, vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rope_scaling=scaling,
        attention_bias=True if model_type == "qwen2" else bias,
        attention_out_bias=bias if model_type == "llama" else False,
        sliding_window=window, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # no pad id in the checkpoint: the first end-of-sequence id pads (as tokenizers often do)
        pad_token_id=pad if pad is not None else (eos[0] if eos else 0),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos, head_dim=cfg.get("head_dim") or 0)


def llama_from_hf(path: str, **overrides) -> LlamaConfig:
    """LlamaConfig from a local llama / mistral / qwen2 checkpoint folder's config.json."""
    fields = _llama_fields(_read_config_json(path), path)
    fields.update(overrides)
    return LlamaConfig(**fields)
