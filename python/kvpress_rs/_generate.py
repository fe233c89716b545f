"""Files generated from the Rust registry of press stages (``src/registry.rs``):

- ``policies.py``: the named cache classes, with every parameter as an explicit keyword
  argument and its default (an IDE shows ``SnapKVCache(model, compression_ratio=...,
  window_size=64, ...)``), docstrings from the registry's one-line docs;
- the registry block of ``_native.pyi``: the names each stage argument of ``Press`` takes;
- the methods tables of ``README.md`` (between ``<!-- registry:methods -->`` markers) and its
  "coming from kvpress" table (``<!-- registry:kvpress -->``).

``python -m kvpress_rs._generate`` rewrites them; ``--check`` exits 1 when one is stale
(``tests_py/test_generated.py`` runs it). Defaults are written once, in Rust.

Example
-------
>>> from kvpress_rs._generate import policies_source
>>> "class SnapKVCache(KVCache):" in policies_source()
True
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

from . import _native

PACKAGE = Path(__file__).resolve().parent
README = PACKAGE.parent.parent / "README.md"
README_BEGIN, README_END = "<!-- registry:methods -->", "<!-- /registry:methods -->"
KVPRESS_BEGIN, KVPRESS_END = "<!-- registry:kvpress -->", "<!-- /registry:kvpress -->"
STUB_BEGIN = "# --- generated from the registry (python -m kvpress_rs._generate): do not edit ---"
STUB_END = "# --- end of the generated block ---"

KINDS = ("scorer", "transform", "layer_budget", "head_budget", "selector", "eviction")
KIND_WORDS = {
    "scorer": "scorer",
    "transform": "score transform",
    "layer_budget": "layer budget",
    "head_budget": "head budget",
    "selector": "selector",
    "eviction": "eviction",
}
# The stage kinds a named cache may fix, and the default of those it leaves open.
FIXABLE = {"layer_budget": "uniform", "head_budget": "uniform", "selector": "topk"}
# The arguments of the named caches that are KVCache's own options, not stage parameters.
CACHE_OPTIONS = ("rerotate", "quantization", "low_bits", "decoding_budget", "decoding_ratio", "decoding_interval",
                 "protect_prompt", "query_stats")


def _stages() -> list[dict]:
    return list(_native.registry())


def _stage(kind: str, name: str) -> dict:
    return next(s for s in _stages() if s["kind"] == kind and s["name"] == name)


def _kind_params(kind: str) -> list[dict]:
    """Every parameter of every stage of ``kind``, once each, in registry order."""
    seen: dict[str, dict] = {}
    for stage in _stages():
        if stage["kind"] == kind:
            for p in stage["params"]:
                seen.setdefault(p["name"], {**p, "stage": stage["name"]})
    return list(seen.values())


def _annotation(p: dict, optional: bool) -> str:
    ty = p["type"]
    return f"{ty} | None" if optional else ty


def _cache_options() -> list[tuple[str, inspect.Parameter]]:
    from .cache import KVCache

    parameters = inspect.signature(KVCache.__init__).parameters
    return [(name, parameters[name]) for name in CACHE_OPTIONS]


def _class_source(preset: dict) -> str:
    """One named cache class."""
    scorer = preset["scorer"]
    fixed = {kind: preset[kind] for kind in FIXABLE}
    ties = dict(preset["ties"])
    args: list[str] = []  # signature entries after `model, *`
    docs: list[str] = []  # numpydoc entries
    passed: list[str] = []  # always passed on
    optional: list[str] = []  # passed on when not None

    def add(p: dict, *, required_default: bool, where: str) -> None:
        name = p["name"]
        if name in ties:
            args.append(f"{name}: {_annotation(p, True)} = None")
            docs.append(f"    {name} : {p['type']}, optional\n        {p['doc'][0].upper()}{p['doc'][1:]} "
                        f"({p['expected']}); default: ``{ties[name]}``.")
            passed.append(f"{name}={name} if {name} is not None else {ties[name]}")
        elif required_default and p["default"] is not None:
            args.append(f"{name}: {p['type']} = {p['default_source']}")
            docs.append(f"    {name} : {p['type']}, default {p['default_source']}\n"
                        f"        {p['doc'][0].upper()}{p['doc'][1:]} ({p['expected']}).")
            passed.append(f"{name}={name}")
        else:
            args.append(f"{name}: {_annotation(p, True)} = None")
            note = f" (default {p['default_source']})" if p["default"] is not None else ""
            docs.append(f"    {name} : {p['type']}, optional\n        {p['doc'][0].upper()}{p['doc'][1:]} "
                        f"({p['expected']}){where}{note}.")
            optional.append(name)

    head = ["model: Any"]
    if scorer is None:
        head.append(f'scorer: str = "{preset["default_scorer"]}"')
    args += ["compression_ratio: float | None = None", "max_tokens: int | None = None"]
    docs += [
        "    model : transformers.PreTrainedModel\n        The model the cache serves.",
        *(["    scorer : str\n        The scorer whose scores the budget splits (any of the registry); its\n"
           "        parameters go in ``**scorer_params``."] if scorer is None else []),
        "    compression_ratio : float, optional\n        Fraction of the prompt's tokens removed, in [0, 1): each layer keeps\n"
        "        ``int(T * (1 - compression_ratio))`` tokens per KV head on average.",
        "    max_tokens : int, optional\n        A fixed per-layer token budget instead of a ratio.",
    ]
    if scorer is not None:
        for p in _stage("scorer", scorer)["params"]:
            add(p, required_default=True, where="")
    for kind, default in FIXABLE.items():
        if fixed[kind] is None:
            args.append(f'{kind}: str = "{default}"')
            names = " | ".join(f'``"{s["name"]}"``' for s in _stages() if s["kind"] == kind)
            docs.append(f"    {kind} : str, default \"{default}\"\n        {KIND_WORDS[kind].capitalize()}: {names}.")
            passed.append(f"{kind}={kind}")
        else:
            passed.append(f'{kind}="{fixed[kind]}"')
        for p in _kind_params(kind):
            own = fixed[kind] is not None and p["stage"] == fixed[kind]
            add(p, required_default=own, where="" if own else f", with {kind}=\"{p['stage']}\"")
    args.append("transforms: Sequence[str] = ()")
    passed.append("transforms=transforms")
    docs.append("    transforms\n        Score transforms (see :class:`~kvpress_rs.KVCache`).")
    for name, param in _cache_options():
        default = repr(param.default)
        annotation = param.annotation if isinstance(param.annotation, str) else param.annotation.__name__
        args.append(f"{name}: {annotation} = {default}")
        passed.append(f"{name}={name}")
    docs.append("    rerotate, quantization, low_bits, decoding_budget, decoding_ratio, decoding_interval, "
                "protect_prompt, query_stats\n        As for :class:`~kvpress_rs.KVCache`.")
    if scorer is None:
        args.append("**scorer_params: Any")
        docs.append("    **scorer_params\n        The scorer's parameters.")
    policy = f'"{scorer}"' if scorer is not None else "scorer"
    lines = [
        f"class {preset['class']}(KVCache):",
        f'    """{preset["title"]}: the scorer ``{preset["default_scorer"]}``'
        + (f', layer budget ``{fixed["layer_budget"]}``' if fixed["layer_budget"] else "")
        + (f', head budget ``{fixed["head_budget"]}``' if fixed["head_budget"] else "")
        + (f', selector ``{fixed["selector"]}``' if fixed["selector"] else "") + ".",
        "",
        f"    {_wrap_doc(preset['doc'], 4)}",
        *([f"    Paper: {preset['url']}"] if preset["url"] else []),
        "",
        "    Parameters",
        "    ----------",
        *docs,
        "",
        "    Example",
        "    -------",
        f"    >>> cache = kvpress_rs.{preset['class']}(model, compression_ratio=0.5)  # doctest: +SKIP",
        '    """',
        "",
        "    def __init__(",
        "        self,",
        *[f"        {a}," for a in head],
        "        *,",
        *[f"        {a}," for a in args],
        "    ):",
    ]
    if optional:
        lines.append("        stage_params = {name: value for name, value in (")
        lines += [f'            ("{name}", {name}),' for name in optional]
        lines.append("        ) if value is not None}")
    else:
        lines.append("        stage_params: dict[str, Any] = {}")
    if scorer is None:
        lines.append("        stage_params.update(scorer_params)")
    lines.append("        super().__init__(")
    lines.append(f"            model, {policy}, compression_ratio=compression_ratio, max_tokens=max_tokens,")
    lines += [f"            {p}," for p in passed]
    lines.append("            **stage_params,")
    lines.append("        )")
    return "\n".join(lines) + "\n"


def _wrap_doc(text: str, indent: int, width: int = 92) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    lines.append(line)
    return ("\n" + " " * indent).join(lines)


def policies_source() -> str:
    """The text of ``policies.py``."""
    presets = list(_native.presets())
    header = '''"""The named caches, one per method: :class:`~kvpress_rs.KVCache` with its scorer (and for
some, its layer or head budget) fixed and every parameter spelled out with its default.

Generated from the Rust registry (``src/registry.rs``) by ``python -m kvpress_rs._generate``:
do not edit; ``tests_py/test_generated.py`` fails when it is stale.

Example
-------
>>> import kvpress_rs  # doctest: +SKIP
>>> cache = kvpress_rs.SnapKVCache(model, compression_ratio=0.5, window_size=64)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import kvpress_rs  # noqa: F401 - the docstring examples' name

from ._native import QuantConfig  # noqa: F401 - annotations
from .cache import KVCache

__all__ = [
'''
    names = "".join(f'    "{p["class"]}",\n' for p in presets)
    classes = "\n\n".join(_class_source(p) for p in presets)
    caches = "".join(f'    "{p["name"]}": {p["class"]},\n' for p in presets)
    return (header + names + '    "CACHES",\n]\n\n\n' + classes + "\n\n"
            + "# The named caches by the method's short name (benchmark specs, the demo).\n"
            + "CACHES: dict[str, type[KVCache]] = {\n" + caches + "}\n")


def stub_block() -> str:
    """The registry block of ``_native.pyi``: one ``Literal`` of names per stage kind."""
    lines = [STUB_BEGIN]
    for kind in KINDS:
        names = [s["name"] for s in _stages() if s["kind"] == kind]
        alias = "".join(part.capitalize() for part in kind.split("_")) + "Name"
        lines.append(f"{alias} = Literal[{', '.join(repr(n) for n in names)}]")
    lines.append("# every stage parameter, name: type = default")
    for kind in KINDS:
        for p in _kind_params(kind):
            default = p["default_source"]
            lines.append(f"#   {p['name']}: {p['type']} = {default}  ({KIND_WORDS[kind]} {p['stage']!r}: {p['expected']})")
    lines.append(STUB_END)
    return "\n".join(lines)


def _params_text(params: list[dict]) -> str:
    return ", ".join(f"`{p['name']}={p['default_source']}`" if p["default"] is not None else f"`{p['name']}` (required)"
                     for p in params) or "—"


def readme_tables() -> str:
    """The README's methods tables (named caches; every stage)."""
    rows = ["| cache | method | reads | parameters (defaults) | kvpress twin |", "|---|---|---|---|---|"]
    for preset in _native.presets():
        scorer = preset["scorer"]
        params = _stage("scorer", scorer)["params"] if scorer else []
        params += [p for kind in FIXABLE if preset[kind]
                   for p in _stage(kind, preset[kind])["params"]]
        title = f"[{preset['title']}]({preset['url']})" if preset["url"] else preset["title"]
        scorer_arg = f'`scorer="{preset["default_scorer"]}"`, ' if scorer is None else ""
        rows.append(f"| `{preset['class']}` | {title} | {preset['reads']} | {scorer_arg}{_params_text(params)} | "
                    f"{'`' + preset['kvpress'] + '`' if preset['kvpress'] else '—'} |")
    stages = ["| stage | name | what it does | parameters (defaults) |", "|---|---|---|---|"]
    for kind in KINDS:
        for s in _stages():
            if s["kind"] == kind:
                ref = f" ([{s['reference']}]({s['url']}))" if s["url"] else ""
                stages.append(f"| {KIND_WORDS[kind]} | `{s['name']}` | {s['summary']}{ref} | {_params_text(s['params'])} |")
    return "\n".join(rows) + "\n\n" + "\n".join(stages)


def kvpress_table() -> str:
    """The README's "coming from kvpress" table: each kvpress press and what it becomes."""
    from .kvpress_compat import INNER, NEEDS_DOWNLOADS, SCORERS

    rows = ["| kvpress 0.5.5 | kvpress-rs |", "|---|---|"]
    for preset in _native.presets():
        if preset["kvpress"] and preset["scorer"]:
            rows.append(f"| `{preset['kvpress']}` | `{preset['class']}` |")
    for press, scorer in SCORERS.items():
        rows.append(f'| `{press}` | `KVCache(model, "{scorer}")` |')
    wrappers = {
        "AdaKVPress": '`head_budget="adakv"` on any cache',
        "ChunkKVPress": '`selector="chunks"` on any cache (`ChunkKVCache`)',
        "EntropyGatedChunkKVPress": '`selector="entropy_chunks"` on any cache',
        "KeyRerotationPress": "`rerotate=True` on any cache",
        "PerLayerCompressionPress": '`layer_budget="explicit", layer_ratios=[...]`',
        "DecodingPress": "`decoding_budget=`, `decoding_interval=`",
        "CompressionRatioDecodingPress": "`decoding_ratio=`, `decoding_interval=`",
    }
    assert set(wrappers) == set(INNER), "every wrapper from_press maps needs its README line"
    rows += [f"| `{press}` | {text} |" for press, text in wrappers.items()]
    rows.append("| `PrefillDecodingPress`, `ComposedPress([one press])` | the presses they hold |")
    rows.append(f"| {', '.join(f'`{p}`' for p in NEEDS_DOWNLOADS)} | not supported: they need downloads from a model hub |")
    return "\n".join(rows)


def _replace_between(text: str, begin: str, end: str, body: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body + "\n" + text[stop:]


def generated_files() -> dict[Path, str]:
    """Each generated file's path and the text it should have."""
    stub = PACKAGE / "_native.pyi"
    stub_text = stub.read_text()
    files = {
        PACKAGE / "policies.py": policies_source(),
        stub: stub_text[: stub_text.index(STUB_BEGIN)] + stub_block() + stub_text[stub_text.index(STUB_END) + len(STUB_END):],
    }
    if README.is_file():
        text = _replace_between(README.read_text(), README_BEGIN, README_END, readme_tables())
        files[README] = _replace_between(text, KVPRESS_BEGIN, KVPRESS_END, kvpress_table())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpress_rs._generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    stale = []
    for path, text in generated_files().items():
        if path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {path}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    raise SystemExit(main())
