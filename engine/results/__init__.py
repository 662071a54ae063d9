"""Results out: a documented JSON record, and DICOM (Comprehensive 3D SR, fractional SEG, secondary capture).

    from engine.results import record_for, export_scan, push_scan, label_heat
    record = record_for(scan, labels=label_result.to_dict())
    heats = [label_heat(scan, record.labels.top.label, model)]
    export_scan(scan, record, heats, "out/")              # de-identified files
    push_scan(PacsClient(), scan, record, heats)           # back into the scan's own study (PACS scans only)

Modules: schema (the JSON record), subject (study + source instances,
identified or de-identified), evidence (heat maps on the scan grid and on
the source instances), coding (codes, research-use notice, algorithm
stamps), sr, seg (SEG + secondary capture), export (build, write, push),
audit (hook), cli (`--export/--push/--pacs-query` of `label` and `ask`).
The de-identification rule these follow is written in engine.pacs.
"""

from engine.results.evidence import Heat, answer_heat, label_heat, view_heat
from engine.results.export import ExportError, OutputUIDs, Outputs, build_outputs, export_scan, push_scan, write_files
from engine.results.schema import NOTICE, SCHEMA, AnswerBlock, LabelBlock, ModelRef, ResultRecord, record_for
from engine.results.subject import Subject, subject_for

__all__ = [
    "NOTICE",
    "SCHEMA",
    "AnswerBlock",
    "ExportError",
    "Heat",
    "LabelBlock",
    "ModelRef",
    "OutputUIDs",
    "Outputs",
    "ResultRecord",
    "Subject",
    "answer_heat",
    "build_outputs",
    "export_scan",
    "label_heat",
    "push_scan",
    "record_for",
    "subject_for",
    "view_heat",
    "write_files",
]
