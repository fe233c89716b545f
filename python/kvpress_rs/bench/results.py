"""Where benchmark results go: ``<out>/<command>.csv`` (one row per measurement),
``<out>/<command>.json`` (the rows plus how they were made: the exact command, date,
machine, versions, threads) and ``<out>/<command>.md`` (a markdown table of the summary
columns, what the README's results section is made of).

>>> meta = run_metadata(["needle", "--model", "tiny"])  # doctest: +SKIP
>>> write(Path("out"), "needle", rows, meta, columns=["method", "found"])  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(argv: list[str], **extra: Any) -> dict[str, Any]:
    """How a run was made: command line, UTC date, machine, library versions."""
    import torch
    import transformers

    import kvpress_rs

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "command": "python -m kvpress_rs.bench " + " ".join(shlex.quote(a) for a in argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "load_average_at_start": load,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvpress_rs": kvpress_rs.__version__,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 1e4:
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(out: Path, command: str, rows: list[dict[str, Any]], meta: dict[str, Any], columns: list[str],
          summary: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Writes the CSV, JSON and markdown files of a run; returns their paths. ``summary``
    (default: ``rows``) is what the markdown table shows."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{command}.{ext}" for ext in ("csv", "json", "md")}
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    table = summary if summary is not None else rows
    paths["json"].write_text(json.dumps({"meta": meta, "columns": columns, "rows": rows, "summary": table},
                                        indent=1, default=str))
    paths["md"].write_text(
        f"`{meta['command']}`\n\n{meta['date']}; {meta['machine']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['torch_threads']} torch threads\n\n"
        + markdown_table(table, columns) + "\n"
    )
    return paths


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) if rows else len(c) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_cell(r.get(c)).rjust(w) for c, w in zip(columns, widths)), flush=True)
