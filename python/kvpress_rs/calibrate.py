"""TriAttention calibration: per layer and query head, the mean pre-RoPE query (as complex
pairs) and the mean magnitude of each pair, measured over plain text, written to a
safetensors file that ``TriAttentionCache(model, decoding_budget=..., query_stats=FILE)``
reads. The reference implementation calibrates offline the same way (one forward over
text; the domain matters little).

Usage::

    python -m kvpress_rs.calibrate --out smollm2_tri.safetensors             # SmolLM2, Austen
    python -m kvpress_rs.calibrate --model /path/to/local/model --text book.txt --tokens 8192 --out stats.safetensors

The queries are the model's own post-RoPE queries as its attention receives them (after
any q_norm and bias), inverse-rotated exactly in Rust — no re-projection per architecture.

Example
-------
>>> from kvpress_rs.calibrate import calibrate  # doctest: +SKIP
>>> calibrate(model, ids, "stats.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def calibrate(model: Any, input_ids: torch.Tensor, out: str | Path) -> Path:
    """Runs ``input_ids`` (1, T) through ``model`` once and writes every layer's query
    statistics to ``out`` (tensors ``layer.{i}.center_re|center_im|magnitude|rest_mean|
    rest_magnitude|count``)."""
    from safetensors.torch import save_file

    from .cache import CompressedLayer, KVCache
    from .errors import InvalidArgumentError

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InvalidArgumentError(f"`input_ids` must be (1, tokens), got {tuple(input_ids.shape)}")
    # A TriAttention cache that never compresses gathers the statistics of every query.
    cache = KVCache(model, "triattention", decoding_budget=10**12, decoding_interval=1)
    model(input_ids, past_key_values=cache, logits_to_keep=1)
    tensors = {}
    for i, layer in enumerate(cache.layers):
        stats = layer.state.query_statistics() if isinstance(layer, CompressedLayer) else None
        if stats is None:
            raise InvalidArgumentError(f"layer {i} is not a full-attention layer: calibration covers full-attention models")
        for name, tensor in stats.tensors():
            tensors[f"layer.{i}.{name}"] = tensor.float().contiguous()
        tensors[f"layer.{i}.count"] = torch.tensor([stats.count], dtype=torch.int64)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"model": str(getattr(model.config, "_name_or_path", "")), "tokens": str(input_ids.shape[1])})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local model folder (transformers format)")
    parser.add_argument("--text", type=Path, default=None, help="a UTF-8 text file (default: Jane Austen's Sense and Sensibility)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.model == "smollm2":
        from .models import load_smollm2

        model, tokenizer = load_smollm2("bfloat16")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.text:
        text = args.text.read_text()
    else:
        from .data import austen_novels

        text = austen_novels()[-1]  # Sense and Sensibility: not the novel (Emma) the benchmarks read
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    path = calibrate(model, torch.tensor([ids]), args.out)
    print(f"wrote {path} ({len(ids)} tokens, {model.config.num_hidden_layers} layers)")


if __name__ == "__main__":
    main()
