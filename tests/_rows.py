"""Small manifest rows for tests: a training-manifest row; a QA question, image row and volume-crop row.

Each helper fills in what every row of its kind has (the id convention, kind, crop zoom), so a test names only what
it is about.
"""

from __future__ import annotations

from training.manifest import Row
from training.qa_data import QARow


def manifest_row(dataset: str, key: str, modality: str, path: str, labels: list[str], subject: str, split: str = "test", **fields) -> Row:
    """A training-manifest row with the recipes' id convention, `<dataset>/<key>`."""
    return Row(id=f"{dataset}/{key}", dataset=dataset, modality=modality, path=path, split=split, subject=subject, labels=labels, **fields)


def qa_item(question: str, answer: str, family: str, candidates: list[str] | None = None, **extra) -> dict:
    """One question of a QA row: closed when it has candidates, open otherwise."""
    return {
        "question": question,
        "answer": answer,
        "family": family,
        "closed": candidates is not None,
        "candidates": candidates or [],
        **extra,
    }


def image_qa_row(id: str, dataset: str, subject: str, modality: str, path: str, split: str = "train", **fields) -> QARow:
    """A QA row about a 2D image."""
    return QARow(id=id, dataset=dataset, split=split, subject=subject, modality=modality, kind="image", path=path, **fields)


def volume_qa_row(
    id: str, dataset: str, subject: str, path: str, crop: dict, split: str = "train", modality: str = "ct", **fields
) -> QARow:
    """A QA row about a crop of a volume, at zoom 1 unless `fields` says otherwise."""
    fields.setdefault("zoom", 1.0)
    return QARow(id=id, dataset=dataset, split=split, subject=subject, modality=modality, kind="volume", path=path, crop=crop, **fields)
