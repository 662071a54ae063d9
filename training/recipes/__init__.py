"""Recipes: public datasets under a local data root -> one manifest (training/manifest.py).

    python -m training.recipes --data-root ../shared/data --out runs/manifest.jsonl [--only nih_cxr14 busi ...]

Design decisions
- One small module per source; `RECIPES` maps the manifest's `dataset` name
  to a function `root -> list[Row]`. Recipes only read local files (no
  downloads, no network imports); paths in rows are relative to the root.
- `DEFAULT` is the ten sets of ../shared/data. The recipes a GPU user adds
  for public sets they have on disk (`medmnist_plus`, `caption_csv`,
  `chexpert_csv`) are registered but not default; their options (flags,
  CSV paths, uncertainty policy) come from the CLI or functools.partial.
- Leakage is checked where it is cheap to check: `build_all` refuses a
  manifest in which a subject sits in two splits of one dataset
  (manifest.check_subject_disjoint), and the BUSI/BreastMNIST recipes tie
  near-duplicate and re-encoded copies of one image to one subject.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Callable

from training.manifest import Row, check_subject_disjoint, write_manifest
from training.recipes._common import recipe_parser, run_recipe_command
from training.recipes.brain_mri import brain_mri
from training.recipes.breastmnist import breastmnist
from training.recipes.busi import busi
from training.recipes.caption_csv import caption_csv
from training.recipes.chexpert import chexpert_csv
from training.recipes.fundus_dr import fundus_dr
from training.recipes.ham10000 import ham10000
from training.recipes.lc25000 import lc25000_lung
from training.recipes.medmnist import medmnist_plus, pneumoniamnist
from training.recipes.nih_cxr14 import nih_cxr14
from training.recipes.totalsegmentator import ct_organs, mr_organs

Recipe = Callable[[Path], list[Row]]

RECIPES: dict[str, Recipe] = {
    "nih_cxr14": nih_cxr14,
    "pneumoniamnist": pneumoniamnist,
    "busi": busi,
    "breastmnist": breastmnist,
    "lc25000_lung": lc25000_lung,
    "fundus_dr": fundus_dr,
    "ham10000": ham10000,
    "ct_organs": ct_organs,
    "mr_organs": mr_organs,
    "brain_mri": brain_mri,
    # not default: public sets a user adds from their own disk
    "medmnist_plus": medmnist_plus,
    "caption_csv": caption_csv,
    "chexpert_csv": chexpert_csv,
}
DEFAULT = (
    "nih_cxr14",
    "pneumoniamnist",
    "busi",
    "breastmnist",
    "lc25000_lung",
    "fundus_dr",
    "ham10000",
    "ct_organs",
    "mr_organs",
    "brain_mri",
)

__all__ = ["RECIPES", "DEFAULT", "build_rows", "build_all", "count_table", "main"]


def build_rows(root: str | Path, names=None, recipes: dict[str, Recipe] | None = None) -> list[Row]:
    """Rows of the named recipes (default: DEFAULT), subject-disjointness checked."""
    recipes = recipes or RECIPES
    names = list(names) if names else list(DEFAULT)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        raise KeyError(f"unknown recipe(s) {unknown}; known: {sorted(recipes)}")
    rows: list[Row] = []
    for name in names:
        rows += recipes[name](Path(root))
    check_subject_disjoint(rows)
    return rows


def counts(rows: list[Row]) -> dict[str, int]:
    """{"<dataset>": total} and {"<dataset>/<split>": n}, datasets in the order they were built."""
    out: Counter = Counter()
    for r in rows:
        out[r.dataset] += 1
        out[f"{r.dataset}/{r.split}"] += 1
    return dict(out)


def build_all(root: str | Path, out_path: str | Path, names=None, recipes: dict[str, Recipe] | None = None) -> dict[str, int]:
    """Write one JSONL manifest of the named recipes; returns counts per dataset and dataset/split."""
    rows = build_rows(root, names, recipes)
    write_manifest(rows, out_path)
    return counts(rows)


def count_table(table: dict[str, int]) -> str:
    sets = [k for k in table if "/" not in k]
    lines = [f"{'dataset':<16}{'train':>8}{'val':>8}{'test':>8}{'total':>8}"]
    for s in sets:
        lines.append(f"{s:<16}" + "".join(f"{table.get(f'{s}/{sp}', 0):>8}" for sp in ("train", "val", "test")) + f"{table[s]:>8}")
    total = {sp: sum(table.get(f"{s}/{sp}", 0) for s in sets) for sp in ("train", "val", "test")}
    lines.append(f"{'all':<16}" + "".join(f"{total[sp]:>8}" for sp in total) + f"{sum(total.values()):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = recipe_parser(
        "python -m training.recipes", __doc__, "manifest to write (JSON Lines)", f"recipes to run (default: {' '.join(DEFAULT)})"
    )
    p.add_argument("--medmnist-flags", nargs="+", default=["pathmnist", "dermamnist", "organamnist"], help="medmnist_plus: MedMNIST flags")
    p.add_argument("--medmnist-size", type=int, default=28, choices=(28, 64, 128, 224), help="medmnist_plus: image size")
    p.add_argument("--caption-csv", default="captions.csv", help="caption_csv: CSV path (relative to the data root)")
    p.add_argument("--chexpert-csv", default="CheXpert-v1.0-small/train.csv", help="chexpert_csv: CSV path")
    p.add_argument("--chexpert-uncertain", default="ones", choices=("ones", "zeros"), help="chexpert_csv: U-Ones or U-Zeros")
    args = p.parse_args(argv)
    recipes = dict(RECIPES)
    recipes["medmnist_plus"] = functools.partial(medmnist_plus, flags=tuple(args.medmnist_flags), size=args.medmnist_size)
    recipes["caption_csv"] = functools.partial(caption_csv, csv=args.caption_csv)
    recipes["chexpert_csv"] = functools.partial(chexpert_csv, csv=args.chexpert_csv, uncertain=args.chexpert_uncertain)
    return run_recipe_command(
        lambda: build_all(args.data_root, args.out, args.only, recipes), lambda table: f"{count_table(table)}\nwrote {args.out}"
    )
