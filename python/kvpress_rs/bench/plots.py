"""The benchmarks' PNG figures (matplotlib, headless): accuracy vs compression ratio per
method, perplexity vs bits (and vs ratio), memory and decode latency vs context length,
kernel bandwidth as a fraction of a copy. Ours are solid lines, kvpress's dashed.

>>> accuracy_vs_ratio(summary_rows, Path("needle.png"))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spec(label: str) -> str:
    return label.rsplit("@", 1)[0]


def _x_ratio(row: dict, fraction_key: str = "kv_fraction") -> float:
    """The requested ratio of an eviction method; 1 − bytes fraction for the others."""
    return row["ratio"] if row.get("ratio") is not None else 1.0 - row[fraction_key]


def accuracy_vs_ratio(summary: list[dict], path: Path, title: str = "needle") -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len({r["length"] for r in summary}) or 1, figsize=(6.5, 4), squeeze=False)
    for ax, length in zip(axes[0], sorted({r["length"] for r in summary})):
        rows = [r for r in summary if r["length"] == length]
        for spec in dict.fromkeys(_spec(r["method"]) for r in rows):
            pts = sorted((_x_ratio(r), r["accuracy"], r.get("kvpress_accuracy"), r.get("kvpress_kv_fraction"))
                         for r in rows if _spec(r["method"]) == spec)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=spec)
            theirs = [p for p in pts if p[2] is not None]
            if theirs:
                ax.plot([p[0] for p in theirs], [p[2] for p in theirs], "x--", color=line.get_color(), label=f"kvpress {spec}")
        ax.set_xlabel("compression ratio (evicted fraction; quantized: 1 − bytes fraction)")
        ax.set_ylabel("needle accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{title}, {length} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def perplexity_plots(summary: list[dict], path: Path, title: str = "perplexity") -> Path:
    """Left: perplexity vs bits per stored element (full and quantized caches); right:
    perplexity vs compression ratio (eviction caches, kvpress dashed)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    quant = [r for r in summary if r.get("ratio") is None]
    for spec in dict.fromkeys(_spec(r["method"]) for r in quant):
        pts = sorted((r["bits"], r["ppl"]) for r in quant if _spec(r["method"]) == spec)
        left.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=spec, markersize=8)
    left.set_xlabel("bits per stored element")
    left.set_ylabel("perplexity")
    left.set_title(f"{title}: quantization")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    evict = [r for r in summary if r.get("ratio") is not None]
    full = [r["ppl"] for r in summary if r["method"] == "full"]
    for spec in dict.fromkeys(_spec(r["method"]) for r in evict):
        pts = sorted((r["ratio"], r["ppl"], r.get("kvpress_ppl")) for r in evict if _spec(r["method"]) == spec)
        line, = right.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=spec)
        if any(p[2] is not None for p in pts):
            right.plot([p[0] for p in pts if p[2]], [p[2] for p in pts if p[2]], "x--", color=line.get_color(),
                       label=f"kvpress {spec}")
    if full:
        right.axhline(full[0], color="gray", lw=1, label="full")
    right.set_xlabel("compression ratio")
    right.set_ylabel("perplexity")
    right.set_title(f"{title}: eviction")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speed_plots(summary: list[dict], path: Path, title: str = "speed") -> Path:
    """Peak memory, KV bytes and decode ms/token against context length, per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = [("peak_mib", "peak memory above start (MiB)"), ("kv_mib", "KV cache (MiB)"), ("decode_ms", "decode ms/token")]
    for ax, (key, label) in zip(axes, keys):
        for method in dict.fromkeys(r["method"] for r in summary):
            rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["length"])
            pts = [(r["length"], r.get(key)) for r in rows if r.get(key) is not None]
            if pts:
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
                theirs = [(r["length"], r.get(f"kvpress_{key}")) for r in rows if r.get(f"kvpress_{key}") is not None]
                if theirs:
                    ax.plot([p[0] for p in theirs], [p[1] for p in theirs], "x--", color=line.get_color(),
                            label=f"kvpress {method}")
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def micro_plot(rows: list[dict[str, Any]], path: Path, title: str = "kernels") -> Path:
    """Bandwidth of each kernel as a fraction of ``clone()``, ours and the torch equivalent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    names = [f"{r['kernel']} ({r['impl']})" for r in rows]
    ax.barh(names, [r["fraction_of_copy"] for r in rows], color=["C0" if r["impl"] == "ours" else "C1" for r in rows])
    ax.axvline(1.0, color="gray", lw=1)
    ax.set_xlabel("bandwidth / clone() bandwidth")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
