"""Policy and CompressionConfig validation, the placement rules, and OptConfig sizes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flexgen_repro import CompressionConfig, Policy, get_opt_config
from flexgen_repro.policy import TIERS, Tier, parse_percent, place_weights, split_rows
from flexgen_repro.weights.layout import expected_tensors

BASE = dict(gpu_batch_size=4, num_gpu_batches=1, w_gpu_percent=100, w_cpu_percent=0,
            cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)


@pytest.mark.parametrize("field,value,match", [
    ("w_gpu_percent", 101, r"w_gpu_percent must be a number in 0\.\.100"),
    ("cache_cpu_percent", -1, r"cache_cpu_percent must be a number in 0\.\.100"),
    ("act_gpu_percent", "50", r"act_gpu_percent"),
    ("gpu_batch_size", 0, r"gpu_batch_size must be an integer >= 1"),
    ("num_gpu_batches", 1.5, r"num_gpu_batches must be an integer >= 1"),
    ("attn_sparsity", 0.0, r"attn_sparsity must be in \(0, 1\]"),
    ("attn_sparsity", 1.5, r"attn_sparsity must be in \(0, 1\]"),
])
def test_policy_rejects_bad_values_naming_field_and_range(field, value, match):
    with pytest.raises(ValueError, match=match):
        Policy(**{**BASE, field: value})


def test_policy_pair_sum_and_disk_properties():
    with pytest.raises(ValueError, match=r"w_gpu_percent \+ Policy.w_cpu_percent must be at most 100"):
        Policy(**{**BASE, "w_gpu_percent": 60, "w_cpu_percent": 50})
    p = Policy(**{**BASE, "w_gpu_percent": 20, "w_cpu_percent": 30, "cache_gpu_percent": 0,
                  "cache_cpu_percent": 75, "act_gpu_percent": 10, "act_cpu_percent": 0})
    assert (p.w_disk_percent, p.cache_disk_percent, p.act_disk_percent) == (50, 25, 90)
    assert p.comp_weight_config == CompressionConfig(4, 64, 0, False)
    assert p.comp_cache_config == CompressionConfig(4, 64, 2, False)


def test_compression_config_validation():
    with pytest.raises(ValueError, match=r"num_bits must be in 2\.\.8"):
        CompressionConfig(num_bits=1)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        CompressionConfig(group_size=0)


def test_parse_percent():
    assert parse_percent(["20", "80", "0", "100", "0", "100"]) == (20, 80, 0, 100, 0, 100)
    with pytest.raises(ValueError, match="six numbers"):
        parse_percent(["1", "2"])


@pytest.mark.parametrize("pct", [(20, 80, 0), (0, 100, 0), (100, 0, 0), (50, 30, 20), (33, 33, 34), (0, 0, 100)])
def test_place_weights_whole_model_within_one_tensor(pct):
    """OPT-30B's tensors: the achieved split is within the largest tensor of the request (the
    original's per-layer midpoint rule puts only ~8% on the GPU for 20/80)."""
    c = get_opt_config("opt-30b")
    h, f = c.hidden_size, c.ffn_embed_dim
    layer = [h * h, h] * 4 + [h, h] + [f * h, f, h * f, h, h, h]
    sizes = [layer] * c.num_hidden_layers
    tiers = place_weights(sizes, pct)
    total = sum(layer) * c.num_hidden_layers
    for tier, want in zip(TIERS, pct):
        got = sum(s for row, trow in zip(sizes, tiers) for s, t in zip(row, trow) if t == tier)
        assert abs(got / total * 100 - want) <= max(layer) / total * 100 + 1e-9


def test_place_weights_spreads_evenly_over_layers():
    """Error diffusion: with 50% on GPU each layer's GPU share stays close to half."""
    layer = [4, 4, 1, 1]
    tiers = place_weights([layer] * 10, (50, 50, 0))
    for row in tiers:
        gpu = sum(s for s, t in zip(layer, row) if t == Tier.GPU)
        assert 2 <= gpu <= 8


def test_split_rows():
    assert split_rows(10, (20, 80, 0)) == [(Tier.GPU, 0, 2), (Tier.CPU, 2, 10)]
    assert split_rows(7, (33, 33, 34)) == [(Tier.GPU, 0, 2), (Tier.CPU, 2, 5), (Tier.DISK, 5, 7)]
    assert split_rows(4, (0, 0, 100)) == [(Tier.DISK, 0, 4)]
    for n in range(1, 20):
        parts = split_rows(n, (30, 30, 40))
        assert sum(b - a for _, a, b in parts) == n


def test_opt_config_presets_and_sizes():
    c = get_opt_config("facebook/opt-175b")
    assert (c.num_hidden_layers, c.hidden_size, c.n_head, c.ffn_embed_dim) == (96, 12288, 96, 49152)
    # 175B parameters within 1% (the published count)
    assert abs(c.num_params() / 175e9 - 1) < 0.01
    assert c.model_bytes() == 2 * c.num_params()
    assert c.cache_bytes(2, 10) == 2 * 2 * 10 * 96 * 12288 * 2
    assert c.hidden_bytes(3, 5) == 3 * 5 * 12288 * 2
    assert get_opt_config("opt-6.7b", dtype=np.float32).dtype_bytes == 4
    assert get_opt_config("OPT-IML-MAX-30B").hidden_size == 7168
    # the shapes of a weight folder add up to the parameter count (embed_tokens counted once)
    assert sum(int(np.prod(s)) for s in expected_tensors(get_opt_config("opt-1.3b")).values()) == \
        get_opt_config("opt-1.3b").num_params()


def test_opt_config_errors():
    with pytest.raises(ValueError, match="unknown model 'opt-7b': choose one of"):
        get_opt_config("opt-7b")
    with pytest.raises(ValueError, match="dtype"):
        get_opt_config("opt-1.3b", dtype="int8")
    with pytest.raises(ValueError, match="unknown OptConfig fields"):
        get_opt_config("opt-1.3b", hiddn_size=3)


def test_opt_config_from_checkpoint_folder(tmp_path):
    folder = tmp_path / "my-opt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True)))
    c = get_opt_config(str(folder), dtype=np.float32)
    assert (c.name, c.hidden_size, c.vocab_size, c.max_seq_len) == ("my-opt", 32, 100, 64)
    (folder / "config.json").write_text(json.dumps(dict(model_type="llama")))
    with pytest.raises(ValueError, match="only OPT"):
        get_opt_config(str(folder))


def _original_per_layer_rule(sizes, pct):
    """The original's rule, restated: within each layer alone, a tensor goes to the tier whose
    cumulative-percent range holds the tensor's midpoint."""
    out = []
    for layer in sizes:
        total, seen, row = sum(layer), 0, []
        for size in layer:
            mid = (seen + size / 2) / total * 100
            seen += size
            row.append(Tier.GPU if mid < pct[0] else Tier.CPU if mid < pct[0] + pct[1] else Tier.DISK)
        out.append(row)
    return out


def test_original_rule_puts_8_percent_of_opt30b_on_gpu_for_20_80():
    """Why the README says `20 80` meant ~8% on the GPU in the original (sep_layer: attention
    and MLP are separate layers; the MLP's two matrices both have midpoints past 20%), and why the
    same placement is `8 92` for us."""
    c = get_opt_config("opt-30b")
    h, f = c.hidden_size, c.ffn_embed_dim
    attn, mlp = [h * h, h] * 4 + [h, h], [f * h, f, h * f, h, h, h]
    sizes = [attn, mlp] * c.num_hidden_layers
    total = sum(map(sum, sizes))

    def gpu_share(tiers):
        return 100 * sum(s for row, t in zip(sizes, tiers) for s, x in zip(row, t) if x == Tier.GPU) / total
    assert 7.5 < gpu_share(_original_per_layer_rule(sizes, (20, 80, 0))) < 9.0
    assert abs(gpu_share(place_weights(sizes, (8, 92, 0))) - 8) < 1
