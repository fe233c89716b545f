"""``python -m kvpress_rs.bench <command> [options]``; ``--help`` on a command lists its
options."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "presses": ("kvpress_rs.bench.presses", "eviction policies vs kvpress 0.5.5: overhead and needle answers"),
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
