"""The JSON result of one scan (`medlens label/ask --export`): a typed record with a documented schema.

Schema `medlens.result/1` (docs/results.md; JSON Schema in docs/result.schema.json):

    {"schema": "medlens.result/1", "notice": "Research use only. Not for diagnosis.", "created": ISO-8601 UTC,
     "software": {"name": "MedLens", "version"},
     "source": {"kind": "dicomweb" | "file", "modality", "shape", "spacing_mm", "content_hash",
                "study_uid", "series_uid"},                     # de-identified UIDs (the library's mapping)
     "labels": null | {"model": {"name", "revision"}, "mode", "aggregation", "prompt_set", "inference_path",
                "scope": "slices" | "volume" | "image", "calibrated", "trust",
                "out_of_distribution", "ood_score", "ood_threshold", "ood_reasons", "field_of_view",
                "findings": [{"label", "rank", "probability", "score", "absent_score", "calibrated_probability",
                              "reported_probability", "verdict", "uncertain", "abstain", "fov_bound", "reasons"}],
                "per_slice": [{"plane", "index", "probabilities": {label: p}, "scores": {label: cosine}}]},
     "answers": [{"question", "answer", "confidence", "closed", "family",
                  "candidates": [{"answer", "probability", "calibrated_probability"?}],
                  "model": {"name", "revision"}, "most_attended_slice", "calibrated_confidence", "verdict",
                  "uncertain", "abstain", "trust", "out_of_distribution", "ood_score", "ood_threshold", "ood_reasons"}],
     "evidence": [{"for", "kind": "label" | "answer", "method", "plane", "slices": [index, ...]}],
     "dicom": {"sr", "seg", "sc": [file names], "notes": [why an object was not written]}}

Design decisions
- Trust (engine.trust; issue 14, engine.zeroshot.trusted and engine.ask):
  `probability` / `confidence` stay the model's raw numbers;
  `calibrated_probability` / `calibrated_confidence` are the checkpoint's
  calibration applied (null for an uncalibrated model, which `trust` says);
  `reported_probability` is what MedLens reports and its `verdict` rests
  on: calibrated, then bounded by the field-of-view check (`fov_bound`,
  `reasons`). `abstain` is true on every finding and answer of a scan
  flagged out of distribution (`out_of_distribution`, `ood_reasons`): the
  model does not stand behind them. null means "not assessed". The
  fields were reserved (null) in the first version of this schema and are
  filled now; the added ones are additive. The DICOM SR reports the
  reported probability, an uncertain finding as "Indeterminate" and an
  abstention without a Present/Absent claim (engine.results.sr).
- Only de-identified values: source UIDs are those of the library's mapping
  (engine.deid.map_uid), model names never carry a local folder path.
- Built from `LabelResult.to_dict()` shapes (the CLI's and the app's CLIP
  results, and the Q-Former's `label_volume`), and from `Answer`s or their
  dicts, so the CLI and the app write the same record.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Any, Sequence

SCHEMA = "medlens.result/1"
NOTICE = "Research use only. Not for diagnosis."
SOFTWARE = "MedLens"
DIGITS = 6


def software_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("medlens")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), DIGITS)


@dataclass(frozen=True)
class ModelRef:
    name: str  # shipped name, hf-hub:org/repo, or local-dir:<folder name> (never the folder's full path)
    revision: str  # content revision of the weights ("" when unknown)

    @classmethod
    def parse(cls, model_id: str, revision: str | None = None) -> "ModelRef":
        """'name@revision' (ClipModel.model_id) or a bare name -> ModelRef, local paths cut to the folder name."""
        text = str(model_id or "unknown")
        name, sep, rev = text.rpartition("@") if revision is None and "@" in text else (text, "", revision or "")
        if name.startswith("local-dir:"):
            name = "local-dir:" + (PurePath(name[len("local-dir:") :]).name or "model")
        return cls(name=name, revision=rev)

    @property
    def id(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


@dataclass
class Finding:
    label: str
    rank: int  # 1 = most probable (by the reported probability)
    probability: float  # the model's raw probability
    score: float | None = None  # cosine (CLIP) or similarity (Q-Former)
    absent_score: float | None = None  # present/absent mode
    calibrated_probability: float | None = None  # the checkpoint's calibration applied; null when uncalibrated
    uncertain: bool | None = None  # the verdict is "uncertain" (inside the band, or a low softmax top)
    abstain: bool | None = None  # the scan is out of distribution: the model does not stand behind this
    reported_probability: float | None = None  # calibrated (when it is), then bounded by the field-of-view check
    verdict: str | None = None  # present / absent / uncertain; softmax: most probable / uncertain / less probable
    fov_bound: float | None = None  # at most this likely to be in the field of view (organs in volumes)
    reasons: list[str] = field(default_factory=list)  # why the reported probability is below the model's

    @property
    def shown(self) -> float:
        return self.probability if self.reported_probability is None else self.reported_probability


_OOD_KEYS = ("out_of_distribution", "ood_score", "ood_threshold", "ood_reasons")


@dataclass
class LabelBlock:
    model: ModelRef
    mode: str
    aggregation: str | None
    prompt_set: str
    inference_path: str
    scope: str  # "slices" (2D model over sampled slices), "volume" (Q-Former, whole volume) or "image" (2D scan)
    findings: list[Finding]
    per_slice: list[dict[str, Any]] = field(default_factory=list)
    out_of_distribution: bool | None = None  # the image is unlike the training data (null: not assessed)
    ood_score: float | None = None  # kNN distance to the model's reference set (null without one)
    ood_threshold: float | None = None
    ood_reasons: list[str] = field(default_factory=list)
    calibrated: bool | None = None  # the reported probabilities are calibrated
    trust: str = ""  # "not calibrated: ..." or what the calibration was fitted on
    field_of_view: dict[str, Any] | None = None  # engine.trust.anatomy.FieldOfView.to_dict() (volumes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], is_2d: bool = False) -> "LabelBlock":
        """From `LabelResult.to_dict()` or `engine.ask.api.label_volume` (the same shape)."""
        scope = data.get("scope") or ("image" if is_2d or not data.get("aggregation") else "slices")
        abstain = data.get("out_of_distribution")
        findings = [
            Finding(
                label=str(item["label"]),
                rank=rank,
                probability=_r(item["probability"]),
                score=_r(item.get("score")),
                absent_score=_r(item.get("absent_score")),
                calibrated_probability=_r(item.get("calibrated_probability")),
                uncertain=item.get("uncertain"),
                abstain=abstain,
                reported_probability=_r(item.get("reported_probability")),
                verdict=item.get("verdict"),
                fov_bound=_r(item.get("fov_bound")),
                reasons=list(item.get("reasons") or []),
            )
            for rank, item in enumerate(data["labels"], start=1)
        ]
        return cls(
            model=ModelRef.parse(str(data.get("model", "unknown"))),
            mode=str(data.get("mode", "softmax")),
            aggregation=data.get("aggregation"),
            prompt_set=str(data.get("prompt_set", "")),
            inference_path=str(data.get("inference_path", "")),
            scope=scope,
            findings=findings,
            per_slice=list(data.get("per_slice") or []),
            **_ood(data),
            calibrated=data.get("calibrated"),
            trust=str(data.get("trust") or ""),
            field_of_view=data.get("field_of_view"),
        )

    @property
    def top(self) -> Finding:
        return self.findings[0]


def _ood(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "out_of_distribution": data.get("out_of_distribution"),
        "ood_score": _r(data.get("ood_score")),
        "ood_threshold": _r(data.get("ood_threshold")),
        "ood_reasons": list(data.get("ood_reasons") or []),
    }


@dataclass
class AnswerBlock:
    question: str
    answer: str
    confidence: float  # the model's raw probability of the answer (generated: mean word probability)
    closed: bool
    model: ModelRef
    family: str | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)  # [{"answer", "probability"(, "calibrated_probability")}]
    most_attended_slice: int | None = None  # axial slice index the queries attended to most (volumes)
    uncertain: bool | None = None  # closed: the top answer is not sure enough (null for generated answers)
    abstain: bool | None = None  # the scan is out of distribution for this model
    calibrated_confidence: float | None = None  # closed, calibrated model
    verdict: str | None = None  # the answer, or "uncertain"
    trust: str = ""  # "not calibrated: ...", what the calibration was fitted on, or why a generated answer is not
    out_of_distribution: bool | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_reasons: list[str] = field(default_factory=list)

    @classmethod
    def from_answer(cls, answer, model_name: str, revision: str = "", most_attended_slice: int | None = None) -> "AnswerBlock":
        """From an engine.ask Answer (or its to_dict())."""
        data = answer if isinstance(answer, dict) else answer.to_dict()
        candidates = data.get("candidates") or []
        return cls(
            question=str(data["question"]),
            answer=str(data["answer"]),
            confidence=_r(data["confidence"]),
            closed=bool(data.get("closed", bool(candidates))),
            model=ModelRef.parse(model_name, revision),
            family=data.get("family"),
            candidates=[_candidate(c) for c in candidates],
            most_attended_slice=most_attended_slice if most_attended_slice is not None else data.get("most_attended_axial_slice"),
            uncertain=data.get("uncertain"),
            abstain=data.get("out_of_distribution"),
            calibrated_confidence=_r(data.get("calibrated_confidence")),
            verdict=data.get("verdict"),
            trust=str(data.get("trust") or ""),
            **_ood(data),
        )

    @property
    def shown(self) -> float:
        return self.confidence if self.calibrated_confidence is None else self.calibrated_confidence


def _candidate(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        out = {"answer": str(item["answer"]), "probability": _r(item["probability"])}
        if item.get("calibrated_probability") is not None:
            out["calibrated_probability"] = _r(item["calibrated_probability"])
        return out
    answer, probability = item
    return {"answer": str(answer), "probability": _r(probability)}


@dataclass
class SourceBlock:
    kind: str  # "dicomweb" (a PACS series) or "file"
    modality: str
    shape: list[int]
    spacing_mm: list[float]
    content_hash: str
    study_uid: str | None  # de-identified (engine.deid.map_uid), as in the library
    series_uid: str | None

    @classmethod
    def of(cls, scan) -> "SourceBlock":
        return cls(
            kind="dicomweb" if scan.origin is not None else "file",
            modality=scan.modality.value,
            shape=[int(n) for n in scan.voxels.shape],
            spacing_mm=[round(float(s), 6) for s in scan.spacing],
            content_hash=scan.content_hash,
            study_uid=scan.metadata.get("StudyInstanceUID"),
            series_uid=scan.metadata.get("SeriesInstanceUID"),
        )


@dataclass
class EvidenceInfo:
    target: str  # what the map is evidence for: "label 'x'" or "question 'y'"
    kind: str  # "label" or "answer"
    method: str  # gradcam / gradient / occlusion (CLIP heat maps) or attention (Q-Former)
    plane: str  # axial / coronal / sagittal / image
    slices: list[int]  # slice indices along the plane's normal that carry evidence


@dataclass
class DicomFiles:
    sr: str | None = None
    seg: str | None = None
    sc: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why an object was not written


@dataclass
class ResultRecord:
    source: SourceBlock
    labels: LabelBlock | None = None
    answers: list[AnswerBlock] = field(default_factory=list)
    evidence: list[EvidenceInfo] = field(default_factory=list)
    dicom: DicomFiles = field(default_factory=DicomFiles)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        return {
            "schema": SCHEMA,
            "notice": NOTICE,
            "created": body.pop("created"),
            "software": {"name": SOFTWARE, "version": software_version()},
            **body,
        }

    @property
    def models(self) -> list[ModelRef]:
        out = [self.labels.model] if self.labels else []
        out.extend(a.model for a in self.answers if a.model not in out)
        return out


def record_for(scan, labels: dict[str, Any] | None = None, answers: Sequence[AnswerBlock] = ()) -> ResultRecord:
    """A record for `scan` with a label result (LabelResult.to_dict() shape) and/or answers."""
    return ResultRecord(
        source=SourceBlock.of(scan),
        labels=LabelBlock.from_dict(labels, scan.is_2d) if labels else None,
        answers=list(answers),
    )
