"""`--export DIR`, `--push` and `--pacs-query` of `medlens label` and `medlens ask`.

    medlens label dicomweb:STUDY/SERIES --export out/ --push
    medlens label --pacs-query "modality=CT date=20240101-20240131" --export out/ --push
    medlens ask dicomweb:STUDY/SERIES "Is the liver visible?" --export out/

Design decisions
- engine/cli.py keeps its commands; this module adds the arguments
  (`add_output_args`) and a `ResultSink` the commands hand each scan's
  result to. One model load serves every scan, as without these flags.
- Per scan: DIR/<modality>-<content hash>-<label|ask>/ holds result.json,
  sr.dcm, seg.dcm and sc.dcm, de-identified; `--push` stores identified
  copies into the scan's own study on the PACS it came from.
- A failed export or push is that scan's failure: reported on stderr (or as
  "export_error" / "push_error" in its JSON line), the others go on, and
  the exit status is 2 when any failed.
- `--pacs-query` turns a PACS search into `dicomweb:` paths (every image
  series of every matching study) and shows a progress bar on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from engine.errors import MedLensError


def add_output_args(p, *, query: bool = False) -> None:
    p.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="write per scan a JSON result and DICOM SR, SEG and overlay (de-identified) into DIR/<scan>/",
    )
    p.add_argument(
        "--push", action="store_true", help="store SR, SEG and overlay into each dicomweb: scan's own study on its PACS (STOW-RS)"
    )
    if query:
        p.add_argument(
            "--pacs-query",
            default=None,
            metavar="QUERY",
            help='also label every image series this PACS search returns, e.g. "modality=CT date=20240101-20240131" '
            "(keys: patient-id, accession, date, modality, study, series)",
        )


def query_paths(query: str, limit: int = 1000) -> list[str]:
    """`dicomweb:` paths of every image series of every study matching `query` (engine.pacs.query syntax)."""
    from engine.pacs import PacsClient, parse_query

    with PacsClient() as pacs:
        studies = pacs.search(parse_query(query), limit=limit)
    paths = [row.path for study in studies for row in study.series if row.is_image]
    if not paths:
        raise MedLensError(f"the PACS search {query!r} found no image series")
    return paths


def progress(paths: Sequence[str], enabled: bool) -> Iterable[str]:
    if not enabled:
        return paths
    from tqdm import tqdm

    return tqdm(paths, unit="series", file=sys.stderr, desc="labelling", leave=False)


class ResultSink:
    """Exports and pushes each scan's result; counts failures."""

    def __init__(self, export: str | None, push: bool):
        self.export_dir = Path(export) if export else None
        self.push = push
        self.failures = 0
        self._client = None

    @classmethod
    def from_args(cls, args) -> "ResultSink | None":
        if not (getattr(args, "export", None) or getattr(args, "push", False)):
            return None
        if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
            raise MedLensError(f"--export {args.export}: exists and is not a folder")
        if args.push:
            from engine.pacs import config_from_settings

            config_from_settings()  # a missing or unusable PACS setting fails before any model is loaded
        return cls(args.export, args.push)

    def _pacs(self):
        if self._client is None:
            from engine.pacs import PacsClient

            self._client = PacsClient()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _deliver(self, path: str, scan, record, heats, kind: str) -> dict[str, Any]:
        from engine.results.export import OutputUIDs, export_scan, push_scan

        done: dict[str, Any] = {}
        uids = OutputUIDs.new()
        if self.export_dir is not None:
            folder = self.export_dir / f"{scan.modality.value.lower()}-{scan.content_hash[:12]}-{kind}"
            try:
                outputs = export_scan(scan, record, heats, folder, paths=[path], uids=uids)
                done["export"] = {"folder": str(folder), "objects": outputs.kinds(), "notes": outputs.notes}
            except MedLensError as exc:
                self.failures += 1
                done["export_error"] = str(exc)
        if self.push:
            try:
                report, outputs = push_scan(self._pacs(), scan, record, heats, uids=uids)
                done["push"] = {"server": report.server, "objects": outputs.kinds(), "stored": len(report.stored), "notes": outputs.notes}
            except MedLensError as exc:
                self.failures += 1
                done["push_error"] = str(exc)
        return done

    def label_done(self, path: str, scan, result, model, prompt_set=None) -> dict[str, Any]:
        """Export / push one scan's zero-shot labels (with the top label's evidence on the sampled slices)."""
        from engine.results.evidence import label_heat
        from engine.results.schema import record_for

        record = record_for(scan, labels=result.to_dict())
        planes = [s.plane for s in result.per_slice]
        plane = "axial" if "axial" in planes or not planes else planes[0]
        indices = [s.index for s in result.per_slice if s.plane == plane] or None
        try:
            heats = [label_heat(scan, record.labels.top.label, model, prompt_set, plane=plane, indices=indices)]
        except MedLensError as exc:
            heats = []
            print(f"medlens: {path}: no evidence map ({exc})", file=sys.stderr)
        return self._deliver(path, scan, record, heats, "label")

    def ask_done(self, path: str, scan, answers: list, model) -> dict[str, Any]:
        """Export / push one scan's answers (each answer's attention as a SEG segment)."""
        from engine.results.evidence import answer_heat
        from engine.results.schema import AnswerBlock, record_for

        blocks = [AnswerBlock.from_answer(a, model.name, getattr(model, "revision", "")) for a in answers]
        record = record_for(scan, answers=blocks)
        heats = [answer_heat(scan, a.question, a.evidence.volume_map) for a in answers if a.evidence is not None]
        return self._deliver(path, scan, record, [h for h in heats if h.planes], "ask")


def describe(path: str, done: dict[str, Any]) -> list[str]:
    """Lines for the text output of label/ask (the JSON output carries `done` as it is)."""
    lines = []
    if "export" in done:
        lines.append(f"  exported {', '.join(done['export']['objects']) or 'JSON only'} + result.json to {done['export']['folder']}")
    if "push" in done:
        lines.append(f"  pushed {', '.join(done['push']['objects'])} into this series' study on {done['push']['server']}")
    for key in ("export", "push"):
        for note in (done.get(key) or {}).get("notes", []):
            lines.append(f"  note: {note}")
    return lines


def report_errors(path: str, done: dict[str, Any]) -> None:
    for key in ("export_error", "push_error"):
        if key in done:
            print(f"medlens: {path}: {key.split('_')[0]} failed: {done[key]}", file=sys.stderr)
