"""One scan's results out: build the DICOM objects, write them to a folder (de-identified), push them to the PACS.

Design decisions
- The objects are built once per destination from a `Subject`
  (engine.results.subject): identified for the PACS the scan came from,
  de-identified for files. New UIDs are drawn once per scan (`OutputUIDs`);
  the de-identified copy uses their library mapping, so an exported SR is
  the pushed SR under the same mapping as every other UID in the library.
- `push` writes only to the server the scan was read from (the PacsOrigin's
  server must equal the client's): results never go to another PACS, and a
  scan from files is never pushed (there is no study to put them in).
- What cannot be written is said, not hidden: `DicomFiles.notes` (and the
  CLI's stderr) carry why a SEG or SC is missing (no evidence, instances
  that are not slices of the scan, a 4D series, a scan without DICOM).
- Every export and push goes through `audit.record` (engine.results.audit),
  the hook the audit log of the `auth` branch plugs into.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import MedLensError
from engine.results import audit
from engine.results.coding import stamp
from engine.results.evidence import Heat
from engine.results.schema import ResultRecord
from engine.results.seg import build_sc, build_seg, placements
from engine.results.sr import build_sr
from engine.results.subject import Subject, subject_for
from engine.scan import Scan


class ExportError(MedLensError):
    """Results could not be written or stored; the message says why."""


@dataclass(frozen=True)
class OutputUIDs:
    """Series and instance UIDs of one scan's new objects."""

    sr_series: str
    sr: str
    seg_series: str
    seg: str
    sc_series: str
    sc: str

    @classmethod
    def new(cls) -> "OutputUIDs":
        from pydicom.uid import generate_uid

        return cls(*(generate_uid() for _ in range(6)))

    def mapped(self) -> "OutputUIDs":
        from engine.deid import map_uid

        return OutputUIDs(*(map_uid(u) for u in (self.sr_series, self.sr, self.seg_series, self.seg, self.sc_series, self.sc)))


@dataclass
class Outputs:
    """The DICOM objects of one scan for one destination."""

    sr: object | None = None
    seg: object | None = None
    sc: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def datasets(self) -> list:
        return [d for d in (self.sr, self.seg, *self.sc) if d is not None]

    def kinds(self) -> list[str]:
        return (["SR"] if self.sr is not None else []) + (["SEG"] if self.seg is not None else []) + ["SC"] * len(self.sc)


def build_outputs(scan: Scan, record: ResultRecord, subject: Subject | None, heats: list[Heat], uids: OutputUIDs) -> Outputs:
    """SR (always, when there is a subject), SEG and SC (when there is evidence on the source grid)."""
    out = Outputs()
    if subject is None:
        out.notes.append(
            "no DICOM objects: the scan was not read from DICOM with instance UIDs (a NIfTI or image file has no study to refer to)"
        )
        return out
    deidentified = not subject.identified
    models = record.models
    out.sr = build_sr(record, subject.source_datasets(), uids.sr_series, uids.sr, scan.modality.value)
    stamp(out.sr, models, "sr", deidentified)
    if not heats:
        out.notes.append("no SEG or overlay: this result has no evidence map (a Q-Former label ranking, or an answer without evidence)")
        return out
    where = placements(scan, subject.instances)
    if not where:
        out.notes.append("no SEG or overlay: the source instances are not plain slices of this scan (a 4D or multi-frame series)")
        return out
    heat_models = [_model_of(record, heat) for heat in heats]
    out.seg = build_seg(scan, heats, subject, where, uids.seg_series, uids.seg, heat_models)
    if out.seg is None:
        out.notes.append("no SEG: the evidence touches none of the source instances")
    else:
        stamp(out.seg, list(dict.fromkeys(heat_models)), "seg", deidentified)
    out.sc = [build_sc(scan, heats[0], subject, where, uids.sc_series, uids.sc)]
    stamp(out.sc[0], [heat_models[0]], "sc", deidentified)
    return out


def _model_of(record: ResultRecord, heat: Heat):
    """The model whose evidence `heat` is: the labels' model, or the model that answered its question."""
    if heat.kind == "label" and record.labels is not None:
        return record.labels.model
    for answer in record.answers:
        if heat.target == f"question '{answer.question}'":
            return answer.model
    return record.models[0]


def write_files(folder: str | Path, record: ResultRecord, outputs: Outputs) -> Path:
    """result.json + sr.dcm / seg.dcm / sc.dcm in `folder` (created); every object de-identified."""
    if any(getattr(d, "PatientIdentityRemoved", "NO") != "YES" for d in outputs.datasets()):
        raise ExportError("refusing to write identified DICOM to files: exports are de-identified (engine.pacs boundary)")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        names = {"sr": "sr.dcm", "seg": "seg.dcm"}
        if outputs.sr is not None:
            outputs.sr.save_as(folder / names["sr"], enforce_file_format=True)
            record.dicom.sr = names["sr"]
        if outputs.seg is not None:
            outputs.seg.save_as(folder / names["seg"], enforce_file_format=True)
            record.dicom.seg = names["seg"]
        for n, sc in enumerate(outputs.sc, start=1):
            name = "sc.dcm" if len(outputs.sc) == 1 else f"sc-{n}.dcm"
            sc.save_as(folder / name, enforce_file_format=True)
            record.dicom.sc.append(name)
        record.dicom.notes = list(outputs.notes)
        (folder / "result.json").write_text(json.dumps(record.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"{folder}: cannot write results ({exc.strerror or exc})") from None
    audit.record("results.export", destination="files", objects=outputs.kinds(), content_hash=record.source.content_hash)
    return folder


def export_scan(
    scan: Scan, record: ResultRecord, heats: list[Heat], folder: str | Path, *, paths=(), uids: OutputUIDs | None = None
) -> Outputs:
    """Build the de-identified objects of `scan` and write them with its JSON result into `folder`."""
    subject = subject_for(scan, paths)
    outputs = build_outputs(scan, record, subject.deidentified() if subject else None, heats, (uids or OutputUIDs.new()).mapped())
    record.evidence = [h.info() for h in heats]
    write_files(folder, record, outputs)
    return outputs


def push_scan(client, scan: Scan, record: ResultRecord, heats: list[Heat], uids: OutputUIDs | None = None):
    """Build the identified objects of a PACS scan and store them into its own study on its own PACS (StoreReport)."""
    origin = scan.origin
    if origin is None:
        raise ExportError("only a scan read from the PACS (a dicomweb: path) can be sent back to it; this one came from files")
    if origin.server != client.identity:
        raise ExportError(f"this scan came from the PACS at {origin.server}; results are written back only there, not to {client.identity}")
    outputs = build_outputs(scan, record, Subject.from_origin(origin), heats, uids or OutputUIDs.new())
    if not outputs.datasets():
        raise ExportError("nothing to send: " + "; ".join(outputs.notes))
    report = client.store(outputs.datasets(), origin.study_uid)
    audit.record("results.push", destination=client.identity, objects=outputs.kinds(), content_hash=record.source.content_hash)
    return report, outputs
