"""`python -m training.compare NAME=EVAL_DIR ...`: the image-tower comparison table of the model card.

Each EVAL_DIR is a `python -m training.evaluate` output (metrics.json);
NAME=... labels the row. Zero-shot headline numbers per task and, where the
evaluation ran `--probe`, linear-probe numbers at 10 % and 100 % of the
labels. Writes Markdown to stdout (and to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from training.evaluate import headline_metrics


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def probe_headline(res: dict, fraction: str) -> dict[str, float]:
    """{task: probe metric at `fraction` ("10%", "100%")} from metrics.json's probe section."""
    out = {}
    for task, r in (res.get("probe") or {}).items():
        if isinstance(r, dict) and r.get("metric"):
            v = (r.get("fractions") or {}).get(fraction, {}).get(r["metric"])
            if isinstance(v, (int, float)):
                out[task] = float(v)
    return out


def table(entries: list[tuple[str, dict, str]]) -> str:
    tasks = []
    for _, res, _ in entries:
        for t in headline_metrics(res):
            if t not in tasks:
                tasks.append(t)
    lines = ["| tower | how | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for name, res, how in entries:
        head = headline_metrics(res)
        lines.append(f"| {name} | {how} | " + " | ".join(_f(head.get(t)) for t in tasks) + " |")
    probe_rows = [(n, r) for n, r, _ in entries if r.get("probe")]
    if probe_rows:
        ptasks = sorted({t for _, r in probe_rows for t in probe_headline(r, "100%") | probe_headline(r, "10%")})
        lines += [
            "",
            "Linear probe on frozen image embeddings (test split; 10 % / 100 % of the train labels):",
            "",
            "| tower | " + " | ".join(ptasks) + " |",
            "|---|" + "---|" * len(ptasks),
        ]
        for name, res in probe_rows:
            p10, p100 = probe_headline(res, "10%"), probe_headline(res, "100%")
            lines.append(f"| {name} | " + " | ".join(f"{_f(p10.get(t))} / {_f(p100.get(t))}" for t in ptasks) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.compare")
    p.add_argument("runs", nargs="+", help="NAME=EVAL_DIR[:how it was trained]")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    entries = []
    for spec in args.runs:
        name, _, rest = spec.partition("=")
        folder, _, how = rest.partition(":")
        entries.append((name, json.loads((Path(folder) / "metrics.json").read_text()), how))
    md = "## Image towers tried (held-out test splits, zero-shot headline per task)\n\n" + table(entries) + "\n"
    if args.out:
        Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
