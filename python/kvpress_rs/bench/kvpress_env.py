"""Where NVIDIA kvpress 0.5.5 runs for side-by-side comparisons: a small side virtualenv
(``.venv-kvpress``, made by ``make bench-deps``) that holds kvpress and transformers 5.2
and reuses the main environment's torch. ``KVPRESS_RS_KVPRESS_PYTHON`` overrides it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIDE_SCRIPT = Path(__file__).with_name("kvpress_side.py")


def kvpress_python() -> Path | None:
    """The interpreter of the kvpress environment, or None if it is not installed."""
    override = os.environ.get("KVPRESS_RS_KVPRESS_PYTHON")
    candidates = [Path(override)] if override else []
    root = Path(__file__).resolve().parents[3]
    candidates.append(root / ".venv-kvpress" / "bin" / "python")
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return None


def run_kvpress(request: dict) -> dict:
    """Runs the request in the kvpress environment and returns its result."""
    python = kvpress_python()
    if python is None:
        raise FileNotFoundError(
            "kvpress 0.5.5 is not installed for comparisons: run `make bench-deps` (it makes .venv-kvpress), "
            "or set KVPRESS_RS_KVPRESS_PYTHON to a Python that has kvpress==0.5.5 and transformers<5.3"
        )
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp, "request.json"), Path(tmp, "result.json")
        req.write_text(json.dumps(request))
        env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
        done = subprocess.run([str(python), str(SIDE_SCRIPT), str(req), str(res)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise RuntimeError(f"the kvpress run failed (exit {done.returncode}); its stderr is above")
        return json.loads(res.read_text())
