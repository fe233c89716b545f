"""``python -m kvpress_rs.bench <command> [options]`` (also ``kvpress-rs-bench``); ``--help``
on a command lists its options. ``--model tiny`` runs any of them in seconds."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "needle": ("kvpress_rs.bench.needle", "needle-in-a-haystack accuracy vs compression ratio, per method, vs kvpress"),
    "ppl": ("kvpress_rs.bench.ppl", "teacher-forced perplexity through the decode path (Austen), vs kvpress and quanto"),
    "speed": ("kvpress_rs.bench.speed", "prefill, compression overhead, decode ms/token, peak memory vs context length"),
    "micro": ("kvpress_rs.bench.micro", "Rust kernels (score, gather, quantize, RoPE shift) as a fraction of a copy"),
    "report": ("kvpress_rs.bench.report", "the README's results section from committed result files"),
    "presses": ("kvpress_rs.bench.presses", "compression overhead and needle answers vs kvpress 0.5.5, one table"),
    "overhead": ("kvpress_rs.bench.overhead", "what a cache adds to a whole prefill vs what kvpress's press adds; ratio 0 vs DynamicCache"),
    "chunks": ("kvpress_rs.bench.chunks", "reusable chunk caches: time to first token, disk bytes, multi-document needle"),
    "decoding": ("kvpress_rs.bench.decoding", "decoding-time compression vs kvpress DecodingPress: ppl, ms/token; block-wise prefill memory, needle"),
    "quant": ("kvpress_rs.bench.quant", "quantized caches vs fp and quanto: ppl, decode, kernels, bytes, frontier"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<12} {text}")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
