"""What `medlens batch` does to each scan: label, ask or index, behind one small interface.

Design decisions
- `TaskSpec` is the job: task name, model source and the task's options.
  Its `key()` (a hash of all three and of the row format) is written into
  every row and keys resuming: rows of another model or other arguments
  are never taken as done.
- A task turns a scan into `ScanWork` (the model images to encode, plus
  what it needs to finish), and finishes it from those images' embeddings.
  The worker encodes the images of every scan in a batch in one call to
  the model's public `encode_images`, so 2D images reach the model in the
  batch sizes its fast path likes, and volumes' slices are batched
  together; each scan is dropped as soon as its images are made.
- label: the same prompt sets, slice sampling, aggregation and scoring as
  `medlens label` (engine.zeroshot.label_from_embeddings), and the same
  trust: the scan's ScanContext (header modality, field of view; with
  "auto" the worker loads the volume model once, lazily, for the first
  volume) is made in prepare while the scan is loaded. index: the same
  embedding and library row as `medlens index` (engine.library.store), the
  row carried back to the one library writer as the task's payload. ask:
  the Q-Former encodes each scan once for all questions (it has no batched
  encoder), so its time counts as model time.
- A model is loaded once per worker process (engine.models.load_model and
  engine.ask keep one per process). On a CUDA device the CLIP model runs
  there in fp32 through `ClipModel.set_inference`, with preprocessing on
  the CPU as everywhere else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from engine.batch.errors import BatchError
from engine.scan import Scan

TASKS = ("label", "ask", "index")
ROW_FORMAT = 2  # bump when rows change meaning: a new key, so old rows are not taken as done (2: trust fields, issue 14)


@dataclass
class TaskSpec:
    task: str  # "label", "ask" or "index"
    model: str  # model source: shipped name, local-dir:/path or hf-hub:org/repo
    options: dict[str, Any] = field(default_factory=dict)  # the task's arguments, JSON-able

    def key(self) -> str:
        """Identifies the job: rows with another key are another job's."""
        raw = json.dumps({"task": self.task, "model": self.model, "options": self.options, "rows": ROW_FORMAT}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model": self.model, "options": self.options, "key": self.key()}


@dataclass
class ScanWork:
    """One scan, prepared: model images to encode and what finishing needs (no reference to the scan)."""

    info: dict[str, Any]  # scan_hash, modality, shape, description (Scan.label: not identifying)
    images: list[np.ndarray]
    context: Any = None
    result: dict[str, Any] | None = None  # set when preparing already produced the answer (ask)


def scan_info(scan: Scan) -> dict[str, Any]:
    return {
        "scan_hash": scan.content_hash,
        "modality": scan.modality.value,
        "shape": [int(s) for s in scan.voxels.shape],
        "description": scan.label,
    }


def _on_device(clip, device: str) -> None:
    """Run a loaded ClipModel's encoders on `device` (fp32); preprocessing stays on the CPU."""
    import torch

    from engine.models.clip import InferencePath

    dev = torch.device(device)
    clip.model.to(dev)

    def image_forward(pixels: torch.Tensor) -> torch.Tensor:
        return clip.model.encode_image(pixels.to(dev, non_blocking=True)).float().cpu()

    def text_forward(tokens: torch.Tensor) -> torch.Tensor:
        return clip.model.encode_text(tokens.to(dev)).float().cpu()

    clip.set_inference(InferencePath(f"{dev.type}-fp32", f"batch worker on {device}", {"device": device}), image_forward, text_forward)


class ClipTask:
    """Shared by label and index: one CLIP model, images encoded in batches."""

    prepare_phase = "preprocess"

    def __init__(self, spec: TaskSpec, device: str = "cpu"):
        self.spec, self.device, self.model = spec, device, None

    def load(self) -> None:
        from engine.zeroshot import resolve_model

        if self.device == "cpu":
            self.model = resolve_model(self.spec.model)  # a broken checkpoint becomes a ModelError that says so
        else:
            from engine.models import load_model

            try:
                self.model = load_model(self.spec.model, fast=False)  # no CPU fast path for a model that runs on a GPU
            except Exception as exc:
                from engine.errors import MedLensError, ModelError

                if isinstance(exc, MedLensError):
                    raise
                raise ModelError(f"cannot load model '{self.spec.model}': {type(exc).__name__}: {str(exc)[:300]}") from None
        if self.device != "cpu":
            _on_device(self.model, self.device)

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        return self.model.encode_images(images)


class LabelTask(ClipTask):
    def __init__(self, spec: TaskSpec, device: str = "cpu"):
        super().__init__(spec, device)
        from engine.zeroshot import clean_labels, load_prompt_set

        opts = spec.options
        self.labels = clean_labels(opts["labels"]) if opts.get("labels") is not None else None
        self.fixed_prompts = load_prompt_set(opts["modality"]) if opts.get("modality") else None
        self.mode = opts.get("mode", "softmax")
        self.aggregation = opts.get("aggregate", "mean")
        self.planes = tuple(opts.get("planes", ("axial",)))
        self.n_slices = int(opts.get("slices", 12))
        self.per_slice = bool(opts.get("per_slice", False))
        self.fov_check = opts.get("fov_check")
        self.volume_model = opts.get("volume_model")

    def prepare(self, scan: Scan, source: str, timer) -> ScanWork:
        from engine.zeroshot import check_mode, load_prompt_set, scan_images

        pset = self.fixed_prompts or load_prompt_set(scan.modality)
        labels = pset.default_labels if self.labels is None else self.labels
        check_mode(self.mode, self.aggregation, len(labels))
        from engine.zeroshot.trusted import scan_context

        images = scan_images(scan, planes=self.planes, n_slices=self.n_slices)
        context = scan_context(scan, self.fov_check, self.volume_model)
        return ScanWork(scan_info(scan), [im.pixels for im in images], (images, labels, pset, context))

    def finish(self, work: ScanWork, embeddings: np.ndarray) -> tuple[dict[str, Any], Any]:
        from engine.zeroshot import label_from_embeddings

        images, labels, pset, context = work.context
        result = label_from_embeddings(
            embeddings, images, labels, self.model, pset, mode=self.mode, aggregation=self.aggregation, context=context
        )
        result.modality = work.info["modality"]
        return {**work.info, **result.to_dict(per_slice=self.per_slice)}, None


class IndexTask(ClipTask):
    def __init__(self, spec: TaskSpec, device: str = "cpu"):
        super().__init__(spec, device)
        self.n_slices = int(spec.options.get("slices", 12))

    def prepare(self, scan: Scan, source: str, timer) -> ScanWork:
        from engine.library.store import embedding_images, scan_row

        return ScanWork(scan_info(scan), embedding_images(scan, self.n_slices), (scan.is_2d, scan_row(scan, source)))

    def finish(self, work: ScanWork, embeddings: np.ndarray) -> tuple[dict[str, Any], Any]:
        from engine.library.store import Prepared, pool_embeddings

        is_2d, row = work.context
        vector, kind = pool_embeddings(embeddings, is_2d)
        payload = Prepared(work.info["scan_hash"], row, vector, kind, self.model_id)
        return {**work.info, "embedding": kind, "status": None}, payload  # status: set by the library writer


class AskTask:
    prepare_phase = "model"  # the Q-Former's encoding is the work; it has no batched encoder

    def __init__(self, spec: TaskSpec, device: str = "cpu"):
        from engine.ask.questions import validate_question

        self.spec, self.model = spec, None
        self.questions = [validate_question(q) for q in spec.options.get("questions", [])]
        if not self.questions:
            raise BatchError("batch ask needs at least one --question")

    def load(self) -> None:
        from engine.ask.api import resolve_ask_model

        self.model = resolve_ask_model(self.spec.model)

    @property
    def model_id(self) -> str:
        return f"{self.model.name}@{self.model.revision}"

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        return np.zeros((len(images), 0), np.float32)

    def prepare(self, scan: Scan, source: str, timer) -> ScanWork:
        from engine.errors import MedLensError

        encoded = self.model.encode(scan)  # once for every question; a scan the model cannot read fails here
        ood = self.model.assess(encoded, scan).to_dict()
        answers = []
        for question in self.questions:
            try:
                answer = self.model.answer_encoded(encoded, question, scan.modality.value)
            except MedLensError as exc:
                answers.append({"question": question, "error": " ".join(str(exc).split())[:500]})
                continue
            data = answer.to_dict()
            row = {k: data[k] for k in ("question", "answer", "confidence", "calibrated_confidence", "verdict", "uncertain", "trust")}
            if answer.closed:
                row["candidates"] = data["candidates"]
            answers.append(row)
        info = scan_info(scan)
        return ScanWork(info, [], result={**info, "model": self.model_id, "answers": answers, **ood})

    def finish(self, work: ScanWork, embeddings: np.ndarray) -> tuple[dict[str, Any], Any]:
        return work.result or {}, None


_TASKS: dict[str, Callable[[TaskSpec, str], Any]] = {"label": LabelTask, "index": IndexTask, "ask": AskTask}


def make_task(spec: TaskSpec, device: str = "cpu"):
    if spec.task not in _TASKS:
        raise BatchError(f"unknown batch task '{spec.task}' (choose {', '.join(TASKS)})")
    return _TASKS[spec.task](spec, device)
