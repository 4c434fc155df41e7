"""The HF Accelerate baseline: its OPT and Llama-family configs against transformers, the placement
a device_map gives, the GPU weight budget, the record it writes, and (only where accelerate is
installed, which the lock file does not pin) dispatched runs on the CPU with layers offloaded to
disk."""
from __future__ import annotations

import sys

import pytest

from flexgen_repro.bench import baselines, limits
from flexgen_repro.config import RopeScaling, _llama_fields, get_model_config, get_opt_config, llama_preset
from flexgen_repro.metrics import GB


@pytest.mark.parametrize("name", ["opt-tiny", "opt-125m"])
def test_hf_config_has_our_parameter_count(name):
    import torch
    from transformers import OPTForCausalLM
    cfg = get_opt_config(name)
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = OPTForCausalLM(baselines.hf_opt_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()  # tied lm_head counted once


LLAMA_NAMES = ["llama-tiny", "llama-tiny-gqa", "llama-2-7b", "llama-2-70b", "mistral-7b",
               "smollm2-135m-instruct"]


@pytest.mark.parametrize("name", LLAMA_NAMES)
def test_hf_llama_config_reads_back_as_ours_field_by_field(name):
    """transformers' config of our shape, read back by the checkpoint reader, is our config: heads,
    KV heads, head width, MLP width, rope theta, vocab, positions, tying, sliding window, ids."""
    cfg = get_model_config(name)
    hf = baselines.hf_config(cfg)
    assert type(hf).__name__ == {"llama": "LlamaConfig", "mistral": "MistralConfig"}[cfg.model_type]
    back = _llama_fields(hf.to_dict(), name)
    assert {k: back[k] for k in back if back[k] != getattr(cfg, k)} == {}


def test_hf_llama_config_carries_rope_scaling_and_refuses_what_it_cannot_express():
    scaling = RopeScaling("llama3", factor=8.0, original_max_position_embeddings=8192)
    cfg = llama_preset("llama-tiny", rope_scaling=scaling, rope_theta=500000.0, max_seq_len=131072)
    back = _llama_fields(baselines.hf_config(cfg).to_dict(), "llama-tiny")
    assert back["rope_scaling"] == scaling and back["rope_theta"] == 500000.0
    with pytest.raises(ValueError, match="biases on all four attention projections or none"):
        baselines.hf_config(llama_preset("llama-tiny", attention_bias=True))
    with pytest.raises(ValueError, match="dynamic rope scaling"):
        baselines.hf_config(llama_preset("llama-tiny", rope_scaling=RopeScaling("dynamic", 2.0)))


@pytest.mark.parametrize("name", LLAMA_NAMES)
def test_hf_llama_model_has_our_parameter_count(name):
    import torch
    cfg = get_model_config(name)
    with torch.device("meta"):
        model = baselines.hf_model_class(cfg)(baselines.hf_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert type(model).__name__ in {"LlamaForCausalLM", "MistralForCausalLM"}
    assert {type(layer).__name__ for layer in model.model.layers} <= set(baselines.NO_SPLIT)


def test_placement_percent_hand_worked():
    sizes = {"model.decoder.embed_tokens.weight": 40, "model.decoder.layers.0.fc1.weight": 30,
             "model.decoder.layers.1.fc1.weight": 20, "model.decoder.layers.10.fc1.weight": 10}
    device_map = {"model.decoder.embed_tokens": 0, "model.decoder.layers.0": 0,
                  "model.decoder.layers.1": "cpu", "model.decoder.layers": "disk"}
    # layers.10 must not match the "layers.1" prefix; it falls to "layers" (disk)
    assert baselines.placement_percent(sizes, device_map) == {"gpu": 70.0, "cpu": 20.0, "disk": 10.0}
    assert baselines.placement_percent(sizes, {"": "cuda:0"})["gpu"] == 100.0
    with pytest.raises(ValueError, match="no entry covering 'lm_head.weight'"):
        baselines.device_of("lm_head.weight", device_map)
    with pytest.raises(ValueError, match="unexpected device_map value 'mps'"):
        baselines.tier_of("mps")


def test_fit_gpu_share_moves_the_last_gpu_modules_to_the_cpu():
    sizes = {"model.decoder.embed_tokens.weight": 40, "model.decoder.layers.0.fc1.weight": 30,
             "model.decoder.layers.1.fc1.weight": 20, "model.decoder.layers.2.fc1.weight": 10}
    device_map = {"model.decoder.embed_tokens": 0, "model.decoder.layers.0": 0,
                  "model.decoder.layers.1": 0, "model.decoder.layers.2": "cpu"}
    # 90 bytes on the GPU against 75: layers.1 (20) moves; 70 fits
    assert baselines.fit_gpu_share(sizes, device_map, 75) == {**device_map, "model.decoder.layers.1": "cpu"}
    assert baselines.fit_gpu_share(sizes, device_map, 90) == device_map  # already fits: unchanged
    assert set(baselines.fit_gpu_share(sizes, device_map, 0).values()) == {"cpu"}


def test_zero_inference_config_hand_checked():
    from flexgen_repro.bench import zero_inference
    cfg = get_opt_config("opt-30b")  # hidden 7168
    ds = zero_inference.ds_config(cfg, 8)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_prefetch_bucket_size"] == zero["stage3_max_live_parameters"] == 2 * 7168 * 7168
    assert zero["stage3_param_persistence_threshold"] == 7168 and ds["train_batch_size"] == 8
    assert "weight_quantization" not in ds and ds["fp16"] == {"enabled": True}
    q = zero_inference.ds_config(cfg, 8, 4, pin=False)
    assert q["weight_quantization"] == {"quantized_initialization": {
        "num_bits": 4, "group_size": 64, "group_dim": 1, "symmetric": False}}
    assert q["zero_optimization"]["offload_param"]["pin_memory"] is False
    with pytest.raises(ValueError, match="must be 0 \\(fp16\\), 4 or 8, got 3"):
        zero_inference.ds_config(cfg, 8, 3)


def test_zero_inference_without_deepspeed_says_how(monkeypatch, capsys):
    from flexgen_repro.bench import zero_inference
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails as when not installed
    assert zero_inference.main(["--model", "opt-125m"]) == 2
    assert "DS_BUILD_OPS=0 python3 -m pip install deepspeed==0.19.8" in capsys.readouterr().err


def test_zero_inference_init_switch_restores():
    from transformers import PreTrainedModel
    from flexgen_repro.bench import zero_inference
    saved = PreTrainedModel._init_weights
    with pytest.raises(RuntimeError):
        with zero_inference._no_transformers_init():
            assert PreTrainedModel._init_weights is not saved
            raise RuntimeError("build failed")
    assert PreTrainedModel._init_weights is saved


def test_weight_budget_leaves_room_for_cache_and_activations():
    cfg = get_opt_config("opt-6.7b")
    total = 80 * GB
    budget = baselines.weight_budget(cfg, 2, 512, 32, 16, total)
    work = max(2 * 512 * 16384 * 2, 2 * 32 * 512 * 512 * 2)  # MLP hidden vs attention scores, fp16
    assert budget == 16 * GB - 2 * 2 * 544 * 32 * 4096 * 2 - 2 * work - baselines.GPU_SLACK_BYTES
    assert budget > cfg.model_bytes()  # so case A's baseline keeps every layer on the GPU
    assert baselines.weight_budget(cfg, 2, 512, 32, None, 8 * GB) < 8 * GB  # no cap: the card
    with pytest.raises(ValueError, match="leaves nothing for opt-6.7b's weights at batch 512"):
        baselines.weight_budget(cfg, 512, 512, 32, 16, total)


def test_weight_budget_of_a_llama_counts_swiglu_and_kv_heads():
    cfg = get_model_config("mistral-7b")  # 8 KV heads of 128, SwiGLU width 14336
    budget = baselines.weight_budget(cfg, 32, 512, 32, 16, 80 * GB)
    cache = 2 * 32 * 544 * 32 * 8 * 128 * 2
    work = max(32 * 512 * 2 * 14336 * 2, 32 * 32 * 512 * 512 * 2)  # gate + up vs attention scores
    assert budget == 16 * GB - cache - 2 * work - baselines.GPU_SLACK_BYTES


def test_record_matches_flex_opt_fields_and_feeds_the_limit():
    cfg = get_opt_config("opt-30b")
    rec = baselines.build_record(cfg, 8, 512, 32, 4.0, 172.0, {"gpu": 18.5, "cpu": 81.5, "disk": 0.0},
                                 15.2, 64.0, "NVIDIA H100", {"accelerate_version": "1.15.0"})
    for key in ("model", "prompt_len", "gen_len", "percent", "gpu_batch_size", "num_gpu_batches",
                "compress_weight", "compress_cache", "cpu_cache_compute", "overlap", "sep_layer",
                "pin_weight", "attn_sparsity", "dtype", "prefill_latency_s", "decode_latency_s",
                "decode_throughput", "total_latency_s", "total_throughput", "peak_gpu_mem_gb",
                "peak_cpu_mem_gb", "model_size_gb", "cache_size_gb", "hidden_size_gb",
                "weight_placement", "device", "measured"):
        assert key in rec, key
    assert rec["percent"] == "18.5 81.5 100 0 100 0" and rec["system"] == "hf-accelerate"
    assert rec["total_throughput"] == pytest.approx(8 * 32 / 176.0)
    assert rec["decode_throughput"] == pytest.approx(8 * 31 / 172.0)
    assert rec["accelerate_version"] == "1.15.0"
    lim = limits.record_limit(rec, limits.BUILTIN["h100-reference"])
    # accelerate's offloaded weights are pageable; h100-reference has no pageable rate: the pinned one
    assert lim.terms["unpinned weights over PCIe"] == pytest.approx(0.815 * cfg.model_bytes() / 54.7e9,
                                                                    rel=1e-12)


def test_main_without_accelerate_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # makes `import accelerate` fail
    assert baselines.main(["--model", "opt-tiny"]) == 2
    assert "needs `accelerate` (pip install accelerate)" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["opt-tiny", "llama-tiny-gqa"])
def test_dispatched_run_on_cpu_with_disk_offload(tmp_path, model):
    pytest.importorskip("accelerate")
    import torch
    from accelerate import infer_auto_device_map
    cfg = get_model_config(model)
    model = baselines.empty_model(cfg)
    budget = cfg.model_bytes() - cfg.layer_params() * 2  # one layer short: it goes to disk
    device_map = infer_auto_device_map(model, max_memory={"cpu": budget, "disk": 1 << 40},
                                       no_split_module_classes=list(baselines.NO_SPLIT),
                                       dtype=torch.float16)
    assert "disk" in device_map.values()
    model = baselines.dispatch_dummy(model, device_map, "cpu", str(tmp_path))
    ids = torch.randint(3, 1000, (2, 16))
    assert baselines._generate(model, ids, 4, "cpu", cfg.pad_token_id) > 0
    sizes = {n: p.numel() * 2 for n, p in model.named_parameters()}
    assert sum(sizes.values()) == cfg.model_bytes()  # tied embeddings once, an untied head apart
    placed = baselines.placement_percent(sizes, device_map)
    assert placed["disk"] > 0 and sum(placed.values()) == pytest.approx(100)


def test_zero_inference_without_deepspeed_says_how_for_a_llama(monkeypatch, capsys):
    from flexgen_repro.bench import zero_inference
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    assert zero_inference.main(["--model", "llama-2-7b"]) == 2
    assert "DS_BUILD_OPS=0 python3 -m pip install deepspeed==0.19.8" in capsys.readouterr().err


def test_deepspeed_arch_list_drops_arch_specific_suffixes():
    from flexgen_repro.bench.zero_inference import sane_arch_list
    assert sane_arch_list("9.0a") == "9.0"
    assert sane_arch_list("8.0;9.0a+PTX") == "8.0;9.0+PTX"
    assert sane_arch_list("9.0 9.0a") == "9.0"
    assert sane_arch_list("10.0a;12") == "10.0;12.0"
    assert sane_arch_list("") == "" and sane_arch_list(None) is None
