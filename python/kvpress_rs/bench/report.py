"""``python -m kvpress_rs.bench report [folder] [--readme README.md]``: the README's
benchmark results section, made from the JSON files the subcommands wrote into ``folder``
(default ``docs/results``): per subcommand, the exact command, date and machine, the
summary table, and the plot. The text between the README's markers
``<!-- bench-results:begin -->`` and ``<!-- bench-results:end -->`` is replaced; without
``--readme`` the section is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .results import markdown_table

BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"

TITLES = {
    "needle": "Needle in a haystack: accuracy vs compression",
    "ppl": "Perplexity through the decode path",
    "speed": "Prefill, compression, decode and memory vs context length",
    "micro": "Kernels vs a copy of the same bytes",
}


def section(folder: Path, relative_to: Path) -> str:
    """The markdown of every ``<command>.json`` in ``folder``, in the order of TITLES.
    Each subcommand's table is its summary; images are linked relative to ``relative_to``."""
    parts = []
    for command, title in TITLES.items():
        path = folder / f"{command}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        meta = data["meta"]
        text = [f"#### {title}", "", f"`{meta['command']}`", "",
                f"{meta['date']}; {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
                f"{meta['torch_threads']} torch thread(s); model {meta.get('model') or '-'} "
                f"({meta.get('dtype') or '-'}, {meta.get('device') or 'cpu'})"
                + (f"; kvpress {meta['kvpress']}" if meta.get("kvpress") else "; kvpress not run"), "",
                markdown_table(data["summary"], data["columns"]), ""]
        png = folder / f"{command}.png"
        if png.exists():
            text += [f"![{title}]({os.path.relpath(png, relative_to)})", ""]
        parts.append("\n".join(text))
    return "\n".join(parts).rstrip() + "\n"


def update_readme(readme: Path, body: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs.bench report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", default=Path("docs/results"))
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args(argv)
    base = args.readme.parent if args.readme else Path.cwd()
    body = section(args.folder, base)
    if args.readme:
        update_readme(args.readme, body)
        print(f"updated {args.readme}")
    else:
        print(body)
    return body


if __name__ == "__main__":
    main()
