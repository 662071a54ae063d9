"""Helpers shared by the recipes: CSV reading, paths relative to the data root, splits.

Design decisions
- Recipes read only local files under a data root; nothing here touches the
  network, and every path written into a row is relative to that root so a
  manifest moves between machines.
- Missing sources raise `FileNotFoundError` with the path looked for: a recipe
  that silently returns nothing would hide a wrong --data-root.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from training.manifest import Row

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"recipe source not found: {path}")
    return path


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    with open(require(path), newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


def rel(path: Path, root: Path) -> str:
    """`path` relative to the data root (POSIX form); absolute when it lies outside it."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


def norm_split(value: str | None) -> str | None:
    return SPLIT_NAMES.get((value or "").strip().lower())


def hashed_split(key: str, val: float = 0.05, test: float = 0.05) -> str:
    """A stable split from a subject id, for sources that publish none (same subject, same split)."""
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)
    return "test" if u < test else "val" if u < test + val else "train"


def split_from_path(path: str) -> str | None:
    """train/valid/test as a folder name in a path (ROCO and CheXpert lay splits out this way)."""
    for part in reversed(Path(path).parts[:-1]):
        split = norm_split(part)
        if split:
            return split
    return None


def image_row(dataset: str, modality: str, folder: str, file: str, **fields: Any) -> Row:
    """A Row for one image file `folder/file`, its id named by the file stem ("<dataset>/<stem>")."""
    return Row(id=f"{dataset}/{Path(file).stem}", dataset=dataset, modality=modality, path=f"{folder}/{file}", **fields)


def labelled_csv_rows(
    root: Path, folder: str, dataset: str, modality: str, fields: Callable[[dict[str, str]], dict[str, Any]]
) -> list[Row]:
    """One image row per line of `folder/labels.csv` (columns `file` and `split`; a blank split is train).

    `fields(record)` gives the rest of the row (subject, labels, view, body_part...) and may raise on a
    label it does not know."""
    rows = []
    for rec in read_csv(Path(root) / folder / "labels.csv"):
        file, split = rec["file"], norm_split(rec["split"]) or "train"
        rows.append(image_row(dataset, modality, folder, file, split=split, **fields(rec)))
    return rows


def recipe_parser(prog: str, module_doc: str, out_help: str, only_help: str) -> argparse.ArgumentParser:
    """A recipe command's parser (described by its module docstring's first paragraph) with the options
    every recipe command takes (--data-root, --out, --only)."""
    p = argparse.ArgumentParser(prog=prog, description=module_doc.split("\n\n")[0])
    p.add_argument("--data-root", required=True, type=Path, help="folder holding the sources (e.g. ../shared/data)")
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--only", nargs="+", metavar="NAME", help=only_help)
    return p


Built = TypeVar("Built")


def run_recipe_command(build: Callable[[], Built], summary: Callable[[Built], str]) -> int:
    """Run a recipe command's build and print its summary (exit 0); a missing source or bad source data
    is one "error: ..." line on stderr and exit status 2 (the summary is made only after a build succeeded)."""
    try:
        built = build()
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(built))
    return 0
