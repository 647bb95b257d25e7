#!/usr/bin/env python
"""Put GPU results into README.md: ``python scripts/bench_readme.py [RESULTS_DIR]``.

Rewrites the part of README.md between ``START`` and ``END`` with one results folder
(default: the newest ``bench/results/*/`` holding a ``gpu_check.json`` or ``bench.json``):
the GPU, versions, commit and ceilings it names, one line per measured case with
llama_fast's best time, its fraction of the ceiling and how it compares with the fastest
other provider, and links to the folder's plots. Only what the JSON holds is written: no
number here is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_fast.bench.report import compare_cases

REPO = Path(__file__).resolve().parent.parent  # the checkout whose README.md this writes

START = "<!-- bench-results:start (written by python scripts/bench_readme.py) -->"
END = "<!-- bench-results:end -->"
RESULT_FILES = ("gpu_check.json", "bench.json")


def newest_results(root: Path) -> Path | None:
    """The results JSON in the newest folder under ``root`` (folders end in the date)."""
    found = [f for d in root.iterdir() if d.is_dir() for f in (d / name for name in RESULT_FILES) if f.is_file()]
    return max(found, key=lambda f: (f.parent.name.rsplit("-", 3)[-3:], f.stat().st_mtime), default=None)


def _ms(x: float) -> str:
    return f"{x:.3f}" if x >= 0.1 else f"{x:.4f}"


def section(report: dict, json_path: Path, readme_dir: Path) -> str:
    """The README text for one report (between the markers)."""
    ceil = report["ceilings"]
    folder = json_path.parent.relative_to(readme_dir) if json_path.is_relative_to(readme_dir) else json_path.parent
    lines = [
        f"Measured on **{report['device']}** with torch {report['torch']}, triton {report['triton']}, commit "
        f"`{(report['commit'] or 'unknown')[:12]}`; ceilings measured in the same run: device-to-device copy "
        f"{_fmt(ceil.get('copy_gbps'), '.0f')} GB/s, bf16 matmul {_fmt(ceil.get('bf16_tflops'), '.0f')} TFLOP/s. "
        f"All rows: [`{folder.as_posix()}/{json_path.stem}.md`]({folder.as_posix()}/{json_path.stem}.md).",
        "",
        "| op | pass | shape | dtype | llama_fast | ms | % of ceiling | fastest other | ms | llama_fast speed-up |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|",
    ]
    for (op, pass_, shape, dtype), ours, best in compare_cases(report["rows"]):
        mine = min(ours, key=lambda r: r["ms"])
        pct = "" if mine["fraction_of_ceiling"] is None else f"{100 * mine['fraction_of_ceiling']:.0f}%"
        other = [best["provider"], _ms(best["ms"]), f"{best['ms'] / mine['ms']:.2f}x"] if best else ["—", "", ""]
        lines.append("| " + " | ".join([op, pass_, shape, dtype, mine["provider"], _ms(mine["ms"]), pct, *other]) + " |")
    plots = sorted(json_path.parent.glob(f"{json_path.stem}-*.png"))
    if plots:
        lines += [""] + [f"![{p.stem}]({folder.as_posix()}/{p.name})" for p in plots]
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def update(readme: Path, text: str) -> None:
    content = readme.read_text()
    if content.count(START) != 1 or content.count(END) != 1 or content.index(START) > content.index(END):
        raise SystemExit(f"{readme} must hold the markers {START!r} and {END!r} once each, in that order")
    head, rest = content.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_readme.py", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", type=Path, help="a results folder or JSON (default: the newest)")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = p.parse_args(argv)
    path = args.results
    if path is not None and path.is_dir():
        path = next((path / n for n in RESULT_FILES if (path / n).is_file()), None)
        if path is None:
            raise SystemExit(f"{args.results} holds none of {', '.join(RESULT_FILES)}")
    path = path or newest_results(REPO / "bench" / "results")
    if path is None:
        raise SystemExit("no results under bench/results/: run bench/gpu_check.py on a GPU first")
    report = json.loads(path.read_text())
    if not str(report.get("device", "")).strip() or "cpu" in str(report["device"]).lower():
        raise SystemExit(f"{path} was not measured on a GPU (device {report.get('device')!r}): not for the README")
    update(args.readme, section(report, path.resolve(), args.readme.resolve().parent))
    print(f"{args.readme}: results of {report['device']} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
