"""Compare two Q-Former evaluations question by question: is the candidate worse than the shipped model beyond chance?

    python -m training.qformer_compare runs/old_eval runs/new_eval [--out compare.json]

Both folders are training/qformer_eval.py outputs on the same QA manifest
(items.jsonl: one line per scored closed question). Questions are paired by
(row id, family, slots); per dataset, per question group and for 3D organ
presence it reports both accuracies, their difference and a 95 % paired
bootstrap interval of the difference (questions resampled together, so the
interval reflects the candidates' disagreement, not each model's own
noise). "worse" means the whole interval lies below zero: issue 14's "no
worse than today's on the test splits, beyond their confidence intervals".
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from training.config import read_jsonl


def _key(item: dict) -> tuple:
    return (item["id"], item["family"], json.dumps(item.get("slots") or {}, sort_keys=True))


def paired(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """Questions both evaluations scored, matched by (row id, family, slots); first occurrence wins."""
    index = {}
    for item in b:
        index.setdefault(_key(item), item)
    return [(x, index[_key(x)]) for x in a if _key(x) in index]


def difference_ci(a: np.ndarray, b: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of mean(b) - mean(a) over paired 0/1 outcomes."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_resamples, len(a)))
    diffs = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    return float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def groups(pairs: list[tuple[dict, dict]]) -> dict[str, list[tuple[dict, dict]]]:
    """The evaluation's reporting groups: 2D per dataset and per question group (the CLIP-comparable items), 3D per family."""
    out = defaultdict(list)
    for x, y in pairs:
        if x.get("kind") == "volume":
            out[f"3d {x['dataset']}/{x['family']}"].append((x, y))
        elif x.get("group"):
            out[f"group {x['group']}"].append((x, y))
            if not x["group"].startswith("all:"):
                out[f"dataset {x['dataset']}"].append((x, y))
    return dict(sorted(out.items()))


def compare(a_items: list[dict], b_items: list[dict]) -> dict:
    rows = {}
    for name, group in groups(paired(a_items, b_items)).items():
        a = np.array([int(x["correct"]) for x, _ in group], dtype=np.float64)
        b = np.array([int(y["correct"]) for _, y in group], dtype=np.float64)
        lo, hi = difference_ci(a, b)
        rows[name] = {
            "n": len(group),
            "a": float(a.mean()),
            "b": float(b.mean()),
            "difference": float(b.mean() - a.mean()),
            "ci95": [lo, hi],
            "verdict": "worse" if hi < 0 else "better" if lo > 0 else "same within CI",
        }
    return rows


def markdown(rows: dict, a_name: str, b_name: str) -> str:
    lines = [f"| group | n | {a_name} | {b_name} | difference | 95 % CI | verdict |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f} | "
            f"{r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f} | {r['verdict']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.qformer_compare", description=__doc__.split("\n")[0])
    p.add_argument("a", help="evaluation folder of the reference model (e.g. the shipped one)")
    p.add_argument("b", help="evaluation folder of the candidate")
    p.add_argument("--out", default=None, help="JSON (and a .md beside it)")
    args = p.parse_args(argv)
    rows = compare(read_jsonl(Path(args.a) / "items.jsonl"), read_jsonl(Path(args.b) / "items.jsonl"))
    md = markdown(rows, "A", "B")
    print(f"A = {args.a}\nB = {args.b}\n\n{md}")
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "groups": rows}, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(f"A = {args.a}, B = {args.b}\n\n{md}\n")
    worse = [k for k, r in rows.items() if r["verdict"] == "worse"]
    print(f"\nworse beyond the 95 % interval: {', '.join(worse) if worse else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
