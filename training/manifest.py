"""Manifests: the one data format every trainer and evaluator reads.

A manifest is a JSON Lines file, one `Row` per image (or volume slice).
Recipes (training/recipes) write them from a data root; nothing downstream
knows where a dataset came from.

Design decisions
- Paths are relative to a data root given at read time, so a manifest built
  on one machine works on another (and none of ../shared/data is copied).
- A row points at pixels three ways: an image file (`path`), a frame of an
  .npz array (`path` + `array`), or a slice of a volume (`path` + `slice`).
  `load_pixels` turns any of them into the uint8 RGB square a 2D model sees,
  through the engine's own reader and `engine.zeroshot.imaging.model_image`,
  so training sees exactly the pixels inference sees (windowing, radiological
  orientation, letterboxing).
- `labels` are canonical class names (lower case) present in the image; the
  trainer writes captions from them (training/captions.py), so one image gets
  a different phrasing every epoch. `text` carries a caption when the source
  has one (ROCO-style caption sets).
- Nothing identifying goes into a manifest: subject ids are the sources' own
  pseudonymous ids (NIH patient numbers, HAM lesion ids), never names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from engine.models.preprocess import ImagePreprocess

MODALITIES = ("xray", "ct", "mr", "us", "pathology", "fundus", "dermoscopy")
SPLITS = ("train", "val", "test")
# How each manifest modality is named to the engine (engine.scan.Modality values): upper-cased, "xray" -> "XRAY".
ENGINE_MODALITY = {m: m.upper() for m in MODALITIES}


def validated_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """`cls(**data)`, validated; a field `cls` does not declare is an error ("<what> '<id>' has unknown fields")."""
    unknown = set(data) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{what} {data.get('id')!r} has unknown fields {sorted(unknown)}")
    row = cls(**data)
    row.validate()
    return row


def require_in(where: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: {name} {value!r} not in {allowed}")


@dataclass
class Row:
    id: str  # unique within a manifest, e.g. "pneumoniamnist/train/17"
    dataset: str  # recipe name
    modality: str  # one of MODALITIES
    path: str  # image, .npz or volume file, relative to the data root (or absolute)
    split: str  # "train" | "val" | "test"
    subject: str  # patient / lesion / group / volume id; splits never share one
    labels: list[str] = field(default_factory=list)  # canonical class names present
    text: str | None = None  # a source caption, if the source has one
    array: dict[str, Any] | None = None  # {"key": "train_images", "index": 17} for .npz frames
    slice: dict[str, Any] | None = None  # {"plane": "axial", "index": 12} for volume slices
    view: str | None = None  # "PA", "AP", "axial", ...
    body_part: str | None = None  # "chest", "abdomen", "brain", "breast", "lung", "eye", "skin"
    extra: dict[str, Any] = field(default_factory=dict)  # recipe-specific, never identifying

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}
        data.setdefault("labels", [])
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Row":
        return validated_from_dict(cls, data, "manifest row")

    def validate(self) -> None:
        require_in(f"row {self.id}", "modality", self.modality, MODALITIES)
        require_in(f"row {self.id}", "split", self.split, SPLITS)
        if self.slice is not None and self.slice.get("plane") not in ("axial", "coronal", "sagittal"):
            raise ValueError(f"row {self.id}: slice plane must be axial, coronal or sagittal")


def write_manifest(rows: Iterable[Row], path: str | Path) -> int:
    """Write rows as JSON Lines (atomically); returns the count. Ids must be unique."""
    return write_validated_jsonl(rows, path, "manifest id")


def write_validated_jsonl(rows: Iterable[Any], path: str | Path, id_name: str) -> int:
    """Validate each row and write it as one JSON line, atomically (a .tmp file renamed into place).

    Rows need validate(), to_json() and a unique `id` (a repeat raises "duplicate <id_name> <id>");
    returns the count written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    seen: set[str] = set()
    with open(tmp, "w") as fh:
        for row in rows:
            row.validate()
            if row.id in seen:
                raise ValueError(f"duplicate {id_name} {row.id}")
            seen.add(row.id)
            fh.write(row.to_json() + "\n")
    tmp.replace(path)
    return len(seen)


def read_manifest(path: str | Path, *, splits: Iterable[str] | None = None, datasets: Iterable[str] | None = None) -> list[Row]:
    return read_validated_jsonl(path, Row.from_dict, split=splits, dataset=datasets)


def read_validated_jsonl(path: str | Path, from_dict: Callable[[dict], Any], **keep: Iterable[str] | None) -> list[Any]:
    """Rows of a JSON Lines file (blank lines skipped), each made by `from_dict`.

    keep: field name -> the values to keep (None or empty: keep all), e.g. split=("test",)."""
    wanted = {name: set(values) if values else None for name, values in keep.items()}
    rows = []
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            row = from_dict(json.loads(line))
            if any(allowed and getattr(row, name) not in allowed for name, allowed in wanted.items()):
                continue
            rows.append(row)
    return rows


def check_subject_disjoint(rows: Iterable[Row]) -> None:
    """Raise if any subject appears in more than one split of the same dataset."""
    where: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row.dataset, row.subject)
        if where.setdefault(key, row.split) != row.split:
            raise ValueError(f"subject {row.subject} of {row.dataset} is in both {where[key]} and {row.split}")


# --------------------------------------------------------------------------- pixels
class PixelLoader:
    """Row -> uint8 RGB (size, size, 3), as the engine would show it to a 2D model.

    Volumes and .npz files are opened once and kept (a manifest holds many
    slices of one volume)."""

    def __init__(self, root: str | Path, size: int | ImagePreprocess = 448, cache_volumes: int = 4):
        # size: the model's preprocessing (or just its side): __call__ returns its resized uint8 image;
        # model_image() is always the engine's 448 px view
        self.root = Path(root)
        self.preprocess = size if isinstance(size, ImagePreprocess) else ImagePreprocess(int(size))
        self.size = self.preprocess.size
        self._scans: dict[str, Any] = {}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._cache_volumes = cache_volumes

    def resolve(self, row: Row) -> Path:
        p = Path(row.path)
        return p if p.is_absolute() else self.root / p

    def _scan(self, path: Path, modality: str):
        key = str(path)
        if key not in self._scans:
            from engine.io import load_one
            from engine.scan import Modality

            scan, _result = load_one([path])  # load_one returns (scan, LoadResult)
            if scan.modality in (Modality.OTHER, None):
                scan.modality = Modality(ENGINE_MODALITY[modality])
            if len(self._scans) >= self._cache_volumes:
                self._scans.pop(next(iter(self._scans)))
            self._scans[key] = scan
        return self._scans[key]

    def model_image(self, row: Row):
        """The engine's ModelImage of a file/volume row (pixels plus the slice's `box` in them,
        which maps slice-space overlays such as organ masks onto the pixels). Not for .npz rows."""
        from engine.zeroshot.imaging import MODEL_IMAGE_SIZE, model_image

        if row.array is not None:
            raise ValueError(f"row {row.id}: .npz frames have no engine ModelImage")
        scan = self._scan(self.resolve(row), row.modality)
        volume = int(row.extra.get("volume", 0)) if scan.voxels.ndim == 4 else 0
        if row.slice is not None:
            return model_image(scan, row.slice["plane"], int(row.slice["index"]), volume=volume, size=MODEL_IMAGE_SIZE)
        return model_image(scan, size=MODEL_IMAGE_SIZE)

    def __call__(self, row: Row) -> np.ndarray:
        """The engine's 448 px model image resized by the model's own preprocessing (the object the engine
        runs at inference), so training sees inference's pixels."""
        return self.preprocess.resize(self.pixels448(row))

    def pixels448(self, row: Row) -> np.ndarray:
        """The engine's 448 px uint8 RGB model image of a row (before the model's preprocessing; the
        domain randomisation of training.randomise acts on it)."""
        from engine.zeroshot.imaging import MODEL_IMAGE_SIZE

        if row.array is not None:
            # keep the decoded array, not the NpzFile: indexing an NpzFile re-reads the whole array
            key = (str(self.resolve(row)), str(row.array["key"]))
            if key not in self._arrays:
                with np.load(key[0]) as npz:
                    self._arrays[key] = np.asarray(npz[key[1]])
            frame = np.asarray(self._arrays[key][int(row.array["index"])])
            return _square_rgb(frame, MODEL_IMAGE_SIZE)
        return self.model_image(row).pixels


def _square_rgb(frame: np.ndarray, size: int) -> np.ndarray:
    """A small array image (MedMNIST frames) -> letterboxed uint8 RGB square, like model_image."""
    from PIL import Image

    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).astype(np.uint8)
    pil = Image.fromarray(arr).convert("RGB")
    w, h = pil.size
    scale = size / max(w, h)
    pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(pil, ((size - pil.size[0]) // 2, (size - pil.size[1]) // 2))
    return np.asarray(canvas)


def iter_pixels(rows: Iterable[Row], root: str | Path, size: int = 448) -> Iterator[tuple[Row, np.ndarray]]:
    loader = PixelLoader(root, size)
    for row in rows:
        yield row, loader(row)
