"""QA manifests for "Ask the scan": rows, JSONL I/O, and the pixels/voxels a row points at.

A QA manifest is JSON Lines, one `QARow` per volume crop or 2D image, each
with a list of question/answer items (training/recipes/qa.py builds it:
`python -m training.recipes.qa --data-root ../shared/data --out runs/qa/manifest.jsonl`).

Design decisions
- Two kinds of row. `kind="volume"`: `path` is a volume (NIfTI file or DICOM
  series folder) relative to the data root, `crop` a voxel box in the
  engine Scan's canonical (z, y, x) array (half-open [start, stop) per axis,
  Python slice bounds), `zoom` a scale-jitter factor. `kind="image"`:
  `image_row` is the 2D manifest `Row` (training/manifest.py) it came from,
  loaded through `PixelLoader`, so the Q-Former sees exactly the pixels the
  CLIP models see.
- Each QA item: question, answer (canonical: `engine.ask.questions.
  normalise_answer` leaves it unchanged), family, closed, candidates, slots
  (so a trainer can re-render the question with another template of the
  family every epoch, `render_question(family, **slots)`), and for 2D
  finding questions `task`: the training/tasks.py task whose definition the
  answer follows (the CLIP baseline scores the same items).
- `load_volume_crop` returns a valid RAS+ Scan of the crop: voxels sliced,
  the affine's origin moved to the crop's first voxel (A @ T(x0, y0, z0)),
  spacing unchanged. Zoom jitter is applied by *stating* the spacing zoom
  times larger, about the crop's centre (no resampling here): the model's
  volume preprocessing resamples to a fixed mm spacing, so a volume that
  claims 1.2x larger voxels comes out 1.2x larger in the model's input, with
  one interpolation in all (the model's own) instead of two. The price: with
  zoom != 1 the affine no longer gives true patient millimetres (a
  provenance warning says so); `zoom="none"` gives the true geometry.
- Opened volumes are cached per process (the same volume is cropped
  hundreds of times), a few at a time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from training.manifest import (
    ENGINE_MODALITY,
    MODALITIES,
    SPLITS,
    PixelLoader,
    Row,
    read_validated_jsonl,
    require_in,
    validated_from_dict,
    write_validated_jsonl,
)

KINDS = ("volume", "image")
AXES = ("z", "y", "x")
QA_KEYS = {"question", "answer", "family", "closed", "candidates"}
QA_OPTIONAL = {"slots", "task"}
ZOOM_MODES = ("spacing", "none")
VOLUME_CACHE = 6  # opened volumes kept per process: the QA manifest has 5 train/test volumes + EPI series


@dataclass
class QARow:
    id: str  # unique in the manifest: "<dataset>/<subject>/crop007" or the 2D row's id
    dataset: str  # volumes: ct_organs_3d, mr_organs_3d, brain_mri_3d; images: the 2D recipe's name
    split: str  # train | val | test; subjects never straddle splits (whole manifest)
    subject: str  # volume subject id (ts-ct-a, colin27, ...) or the 2D row's subject
    modality: str  # manifest code (training.manifest.MODALITIES)
    kind: str  # "volume" | "image"
    path: str  # volume file/folder or image file, relative to the data root
    body_region: str | None = None  # head, chest, abdomen, pelvis, breast, eye, skin (None: unknown)
    organs: list[str] = field(default_factory=list)  # organs clearly in view (the organs_in_view answer)
    caption: str = ""  # short findings caption ("CT of the abdomen. In view: liver, spleen.")
    qa: list[dict[str, Any]] = field(default_factory=list)  # question/answer items (module docstring)
    crop: dict[str, list[int]] | None = None  # volume: {"z": [z0, z1], "y": [...], "x": [...]}, half-open
    zoom: float | None = None  # volume: scale jitter (1.0 = none), applied by load_volume_crop
    image_row: dict[str, Any] | None = None  # image: the 2D manifest Row as a dict
    extra: dict[str, Any] = field(default_factory=dict)  # organ fractions, label map path, volume index, ...

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QARow":
        return validated_from_dict(cls, data, "QA row")

    def manifest_row(self) -> Row:
        """The 2D manifest Row of an image row (what PixelLoader reads)."""
        if self.image_row is None:
            raise ValueError(f"QA row {self.id}: a volume row has no 2D manifest row")
        return Row.from_dict(dict(self.image_row))

    def validate(self) -> None:
        for name, value, allowed in (("kind", self.kind, KINDS), ("split", self.split, SPLITS), ("modality", self.modality, MODALITIES)):
            require_in(f"QA row {self.id}", name, value, allowed)
        if self.kind == "volume":
            if not isinstance(self.crop, dict) or set(self.crop) != set(AXES):
                raise ValueError(f"QA row {self.id}: a volume row needs crop {{'z','y','x'}} boxes")
            for axis, box in self.crop.items():
                if len(box) != 2 or not 0 <= int(box[0]) < int(box[1]):
                    raise ValueError(f"QA row {self.id}: crop {axis} {box} is not a [start, stop) box")
            if self.zoom is not None and not 0.25 <= float(self.zoom) <= 4.0:
                raise ValueError(f"QA row {self.id}: zoom {self.zoom} is outside 0.25-4")
            if self.image_row is not None:
                raise ValueError(f"QA row {self.id}: a volume row has no image_row")
        else:
            if self.image_row is None:
                raise ValueError(f"QA row {self.id}: an image row needs image_row (the 2D manifest row)")
            if self.crop is not None:
                raise ValueError(f"QA row {self.id}: an image row has no crop")
            self.manifest_row()  # validates the 2D row
        for i, item in enumerate(self.qa):
            missing = QA_KEYS - set(item)
            unknown = set(item) - QA_KEYS - QA_OPTIONAL
            if missing or unknown:
                raise ValueError(f"QA row {self.id} item {i}: missing {sorted(missing)}, unknown {sorted(unknown)}")
            if item["closed"] and item["answer"] not in item["candidates"]:
                raise ValueError(f"QA row {self.id} item {i}: answer {item['answer']!r} not among its candidates")


def write_qa_manifest(rows: Iterable[QARow], path: str | Path) -> int:
    """Write rows as JSON Lines (atomically; ids unique, subjects split-disjoint); returns the count."""
    rows = list(rows)
    check_subject_disjoint(rows)
    return write_validated_jsonl(rows, path, "QA row id")


def read_qa_manifest(
    path: str | Path, *, splits: Iterable[str] | None = None, datasets: Iterable[str] | None = None, kinds: Iterable[str] | None = None
) -> list[QARow]:
    return read_validated_jsonl(path, QARow.from_dict, split=splits, dataset=datasets, kind=kinds)


# Datasets whose subjects are volume subjects (ts-ct-a, colin27, ...): 2D slices and 3D crops of one
# volume share a subject id, so the split check must see them together.
VOLUME_DATASETS = frozenset({"ct_organs", "mr_organs", "brain_mri", "ct_organs_3d", "mr_organs_3d", "brain_mri_3d"})


def subject_key(row: QARow) -> tuple[str, str]:
    return ("volume", row.subject) if row.dataset in VOLUME_DATASETS else (row.dataset, row.subject)


def check_subject_disjoint(rows: Iterable[QARow]) -> None:
    """Raise if a subject sits in two splits (volume subjects across 2D and 3D datasets together)."""
    where: dict[tuple[str, str], str] = {}
    for row in rows:
        key = subject_key(row)
        if where.setdefault(key, row.split) != row.split:
            raise ValueError(f"subject {row.subject} ({row.dataset}) is in both {where[key]} and {row.split}")


def iter_qa(
    rows: Iterable[QARow], *, families: Iterable[str] | None = None, closed: bool | None = None
) -> Iterator[tuple[QARow, dict[str, Any]]]:
    """(row, qa item) pairs, optionally only some families / only closed or open items."""
    keep = set(families) if families else None
    for row in rows:
        for item in row.qa:
            if keep is not None and item["family"] not in keep:
                continue
            if closed is not None and bool(item["closed"]) != closed:
                continue
            yield row, item


# --------------------------------------------------------------------------- volumes
def resolve(root: str | Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


@lru_cache(maxsize=VOLUME_CACHE)
def open_volume(path: str, modality: str, volume: int = 0):
    """The engine Scan of a volume file/folder (one 3D volume of a 4D series), cached per process."""
    from engine.io import load_one
    from engine.scan import Modality

    scan, _result = load_one([path])
    scan = scan.volume(volume) if scan.voxels.ndim == 4 else scan
    if scan.modality in (Modality.OTHER, None):  # NIfTI stores no modality; the row knows it
        scan = replace(scan, modality=Modality(ENGINE_MODALITY[modality]))
    scan.voxels.setflags(write=False)  # shared by every crop of this volume
    return scan


def crop_scan(scan, crop: dict[str, list[int]], zoom: float = 1.0, zoom_mode: str = "spacing"):
    """A Scan of the voxel box `crop` ({"z": [z0, z1], ...}, half-open) of a 3D Scan, geometry
    fixed; with zoom_mode "spacing" the stated spacing is scaled by `zoom` about the crop centre."""
    from engine.scan import Scan

    if zoom_mode not in ZOOM_MODES:
        raise ValueError(f"zoom_mode {zoom_mode!r} not in {ZOOM_MODES}")
    if scan.voxels.ndim != 3:
        raise ValueError(f"crop_scan needs one 3D volume, got voxels of shape {scan.voxels.shape}")
    (z0, z1), (y0, y1), (x0, x1) = (tuple(int(v) for v in crop[a]) for a in AXES)
    shape = scan.voxels.shape
    for a, (lo, hi), n in zip(AXES, ((z0, z1), (y0, y1), (x0, x1)), shape):
        if not 0 <= lo < hi <= n:
            raise ValueError(f"crop {a} [{lo}, {hi}) lies outside the volume's {n} voxels")
    voxels = scan.voxels[z0:z1, y0:y1, x0:x1]
    affine = np.asarray(scan.affine, dtype=np.float64).copy()
    # the affine takes voxel (x, y, z): crop voxel (i, j, k) is voxel (i + x0, j + y0, k + z0) of the scan
    affine[:3, 3] = affine[:3, :3] @ np.array([x0, y0, z0], dtype=np.float64) + affine[:3, 3]
    spacing = tuple(scan.spacing)
    warnings = list(scan.provenance.warnings)
    zoom = float(zoom or 1.0)
    if zoom_mode == "spacing" and abs(zoom - 1.0) > 1e-9:
        centre_vox = np.array([(x1 - x0 - 1) / 2, (y1 - y0 - 1) / 2, (z1 - z0 - 1) / 2, 1.0])
        centre_mm = affine @ centre_vox
        affine[:3, :3] *= zoom
        affine[:3, 3] = centre_mm[:3] - affine[:3, :3] @ centre_vox[:3]
        spacing = tuple(s * zoom for s in spacing)
        warnings.append(f"spacing scaled x{zoom:.3f} (training zoom jitter): millimetres are not true patient geometry")
    provenance = replace(scan.provenance, warnings=warnings)
    return Scan(np.array(voxels), spacing, affine, scan.modality, dict(scan.metadata), provenance)


def load_volume_crop(root: str | Path, row: QARow, zoom_mode: str = "spacing"):
    """The engine Scan of a volume row's crop (module docstring: geometry and zoom)."""
    if row.kind != "volume" or row.crop is None:
        raise ValueError(f"QA row {row.id} is not a volume row")
    volume = int((row.extra or {}).get("volume", 0))
    scan = open_volume(str(resolve(root, row.path)), row.modality, volume)
    return crop_scan(scan, row.crop, float(row.zoom or 1.0), zoom_mode)


# --------------------------------------------------------------------------- images
@lru_cache(maxsize=4)
def _pixel_loader(root: str, size: int) -> PixelLoader:
    return PixelLoader(root, size=size)


def load_image(root: str | Path, row: QARow, size: int = 448) -> np.ndarray:
    """uint8 RGB (size, size, 3) of an image row, through training.manifest.PixelLoader."""
    return _pixel_loader(str(root), int(size))(row.manifest_row())


# --------------------------------------------------------------------------- MedPix smoke set
MEDPIX = "image_text/medpix_sample"


class MedPixItem(NamedTuple):
    image: Path  # absolute path of the PNG
    question: str
    answer: str
    case_id: str
    image_id: str


def medpix_items(root: str | Path) -> list[MedPixItem]:
    """The 60 question/answer pairs of the MedPix sample (6 images, 2 cases): a smoke test of
    free-text answering only (answers are caption sentences, far too few to train or score on)."""
    folder = Path(root) / MEDPIX
    path = folder / "qa_caption.json"
    if not path.is_file():
        raise FileNotFoundError(f"MedPix sample not found: {path}")
    items = []
    for rec in json.loads(path.read_text(encoding="utf-8")):
        image = folder / f"{rec['image_id']}.png"
        if not image.is_file():
            raise FileNotFoundError(f"MedPix image {image} listed in {path.name} is missing")
        items.append(MedPixItem(image, str(rec["question"]), str(rec["answer"]), str(rec["case_id"]), str(rec["image_id"])))
    return items
