"""PNG plots of a benchmark report: one figure per op and dtype, one panel per pass (and
per group of shapes that belong on one axis), one line per provider.

The x axis is the size the suite recorded for each shape in report["sizes"] (bytes moved
for the memory-bound ops, sequence length for attention, K/V cache size for decode,
sequence or prompt length end to end); the y axis is the row's throughput: TFLOP/s where
the row has it (attention, training, prefill), else GB/s. Rows without a measurement are
left out. matplotlib is optional: ``write_plots`` returns None when it is not installed.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path


_PASS_ORDER = {p: i for i, p in enumerate(("fwd", "bwd", "fwd+bwd", "fwd+bwd+adamw", "prefill", "decode", "decode_graph"))}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _series(report: dict) -> dict:
    """{(op, dtype): {(pass, group, unit): {provider: [(x, y)]}}} from the measured rows."""
    sizes = report.get("sizes", {})
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in report["rows"]:
        size = sizes.get(row["op"], {}).get("shapes", {}).get(row["shape"])
        y, unit = (row["tflops"], "TFLOP/s") if row["tflops"] is not None else (row["gbps"], "GB/s")
        if size is None or y is None:
            continue
        out[(row["op"], row["dtype"])][(row["pass"], size["group"], unit)][row["provider"]].append((size["x"], y))
    return out


def write_plots(report: dict, out_dir: Path, stem: str) -> list[Path] | None:
    """Write ``<stem>-<op>-<dtype>.png`` files into ``out_dir``; their paths, or None
    without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    sizes = report.get("sizes", {})
    written = []
    for (op, dtype), panels in sorted(_series(report).items()):
        keys = sorted(panels, key=lambda k: (_PASS_ORDER.get(k[0], len(_PASS_ORDER)), k))
        providers = sorted({p for panel in panels.values() for p in panel})
        colour = {p: f"C{i % 10}" for i, p in enumerate(providers)}  # one colour per provider in every panel
        cols = min(3, len(keys))
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, (pass_, group, unit) in zip(axes.flat, keys):
            for provider, points in sorted(panels[(pass_, group, unit)].items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider,
                        color=colour[provider])
            ax.set_title(f"{op} {pass_} {group}".strip(), fontsize=9)
            ax.set_xlabel(sizes.get(op, {}).get("x_label", "size"))
            ax.set_ylabel(unit)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.set_visible(False)
        fig.suptitle(f"{report['device']} · {op} · {dtype}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}-{_slug(op)}-{dtype}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
