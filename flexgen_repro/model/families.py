"""Model families as small descriptions: which norm, position encoding and MLP the shared layers
use, and each layer's weights (short key, weight-folder file name, shape).

OPT: LayerNorm (weight and bias), learned positions offset by 2, ReLU MLP with biases, output tied
to the token embedding; files named `decoder.*`. Llama (also Mistral and Qwen2): RMSNorm, rotary
positions, SwiGLU MLP, grouped-query attention (k and v have n_kv_head heads), optional q/k/v and
output biases, output tied or `lm_head.weight`; files named after the Hugging Face keys without
`model.`. The KV cache holds (batch, n_kv_head, seq, head_dim) per layer in both.
"""
from __future__ import annotations

from dataclasses import dataclass

from flexgen_repro.model.base import WeightSpec


@dataclass(frozen=True)
class Family:
    name: str
    norm: str        # "layer_norm" (weight and bias) or "rms_norm" (weight)
    positions: str   # "learned" (a table added to the embedding) or "rotary" (q and k rotated)
    mlp: str         # "relu" (fc1, fc2 with biases) or "swiglu" (down(silu(gate) * up))


OPT = Family("opt", norm="layer_norm", positions="learned", mlp="relu")
LLAMA = Family("llama", norm="rms_norm", positions="rotary", mlp="swiglu")
FAMILIES = {f.name: f for f in (OPT, LLAMA)}


def family_of(config) -> Family:
    try:
        return FAMILIES[config.family]
    except KeyError:
        raise ValueError(f"model family {config.family!r} is not supported; choose one of "
                         f"{sorted(FAMILIES)}") from None


def opt_layer_names(i: int) -> dict[str, str]:
    """Short key -> file name of OPT layer i's tensors."""
    p = f"decoder.layers.{i}."
    names = {}
    for proj in ("q", "k", "v", "out"):
        names[f"w_{proj}"] = f"{p}self_attn.{proj}_proj.weight"
        names[f"b_{proj}"] = f"{p}self_attn.{proj}_proj.bias"
    names.update(w_ln_attn=f"{p}self_attn_layer_norm.weight", b_ln_attn=f"{p}self_attn_layer_norm.bias",
                 w_fc1=f"{p}fc1.weight", b_fc1=f"{p}fc1.bias",
                 w_fc2=f"{p}fc2.weight", b_fc2=f"{p}fc2.bias",
                 w_ln_mlp=f"{p}final_layer_norm.weight", b_ln_mlp=f"{p}final_layer_norm.bias")
    return names


def _projection_sizes(config) -> tuple[int, int]:
    """(query width, key/value width): n_head * head_dim and n_kv_head * head_dim."""
    return config.n_head * config.head_dim, config.n_kv_head * config.head_dim


def input_specs(config) -> list[WeightSpec]:
    c = config
    if family_of(c) is OPT:
        return [WeightSpec("w_token", "decoder.embed_tokens.weight", (c.vocab_size, c.hidden_size), "embed"),
                WeightSpec("w_pos", "decoder.embed_positions.weight", (c.max_seq_len + 2, c.hidden_size),
                           "embed")]
    return [WeightSpec("w_token", "embed_tokens.weight", (c.vocab_size, c.hidden_size), "embed")]


def attention_specs(config, i: int) -> list[WeightSpec]:
    h = config.hidden_size
    q, kv = _projection_sizes(config)
    if family_of(config) is OPT:
        n = opt_layer_names(i)
        out = []
        for proj in ("q", "k", "v", "out"):
            out += [WeightSpec(f"w_{proj}", n[f"w_{proj}"], (h, h), "matrix"),
                    WeightSpec(f"b_{proj}", n[f"b_{proj}"], (h,), "bias")]
        return out + [WeightSpec("w_ln_attn", n["w_ln_attn"], (h,), "ln_weight"),
                      WeightSpec("b_ln_attn", n["b_ln_attn"], (h,), "ln_bias")]
    p = f"layers.{i}."
    out = []
    for proj, rows in (("q", q), ("k", kv), ("v", kv)):
        out.append(WeightSpec(f"w_{proj}", f"{p}self_attn.{proj}_proj.weight", (rows, h), "matrix"))
        if config.attention_bias:
            out.append(WeightSpec(f"b_{proj}", f"{p}self_attn.{proj}_proj.bias", (rows,), "bias"))
    out.append(WeightSpec("w_out", f"{p}self_attn.o_proj.weight", (h, q), "matrix"))
    if config.attention_out_bias:
        out.append(WeightSpec("b_out", f"{p}self_attn.o_proj.bias", (h,), "bias"))
    return out + [WeightSpec("w_ln_attn", f"{p}input_layernorm.weight", (h,), "ln_weight")]


def mlp_specs(config, i: int) -> list[WeightSpec]:
    h = config.hidden_size
    if family_of(config) is OPT:
        f, n = config.ffn_embed_dim, opt_layer_names(i)
        return [WeightSpec("w_fc1", n["w_fc1"], (f, h), "matrix"), WeightSpec("b_fc1", n["b_fc1"], (f,), "bias"),
                WeightSpec("w_fc2", n["w_fc2"], (h, f), "matrix"), WeightSpec("b_fc2", n["b_fc2"], (h,), "bias"),
                WeightSpec("w_ln_mlp", n["w_ln_mlp"], (h,), "ln_weight"),
                WeightSpec("b_ln_mlp", n["b_ln_mlp"], (h,), "ln_bias")]
    f, p = config.intermediate_size, f"layers.{i}."
    return [WeightSpec("w_gate", f"{p}mlp.gate_proj.weight", (f, h), "matrix"),
            WeightSpec("w_up", f"{p}mlp.up_proj.weight", (f, h), "matrix"),
            WeightSpec("w_down", f"{p}mlp.down_proj.weight", (h, f), "matrix"),
            WeightSpec("w_ln_mlp", f"{p}post_attention_layernorm.weight", (h,), "ln_weight")]


def output_specs(config) -> list[WeightSpec]:
    c = config
    if family_of(c) is OPT:
        return [WeightSpec("w_ln", "decoder.layer_norm.weight", (c.hidden_size,), "ln_weight"),
                WeightSpec("b_ln", "decoder.layer_norm.bias", (c.hidden_size,), "ln_bias"),
                WeightSpec("w_token", "decoder.embed_tokens.weight", (c.vocab_size, c.hidden_size), "embed")]
    head = "embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    return [WeightSpec("w_ln", "norm.weight", (c.hidden_size,), "ln_weight"),
            WeightSpec("w_token", head, (c.vocab_size, c.hidden_size), "embed")]


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Every file of a complete weight folder with its shape: embeddings and final norm first,
    then each layer's tensors in model order (a tied output is the token embedding's file)."""
    specs = input_specs(config) + output_specs(config)
    for i in range(config.num_hidden_layers):
        specs += attention_specs(config, i) + mlp_specs(config, i)
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        out.setdefault(spec.file, spec.shape)
    return out
