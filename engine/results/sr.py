"""Findings and answers as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report), through highdicom.

One measurement group (TID 1501) per label and per answer:
- finding type: the label (or the question) as a 99MEDLENS concept;
- a qualitative evaluation: label -> Present / Absent (present/absent mode),
  "Most probable of the labels" / "Less probable than the top label"
  (softmax over labels); question -> the answer; "Indeterminate" when the
  result is flagged uncertain, "Not assessed" when the model abstains;
- a measurement DCM "Probability" (UCUM "1"): the label's reported
  probability (calibrated when the model is, bounded by the field-of-view
  check) or the answer's calibrated confidence (its raw one when the model
  is uncalibrated), as in the JSON result's reported numbers;
- the algorithm identification (model name, revision, parameters) on the
  group and on the measurement.
The report's evidence (Current Requested Procedure Evidence Sequence) lists
every source instance of the scan; the observer is the MedLens device.
"""

from __future__ import annotations

from engine.results.coding import SCHEME, derived_uid, parameters, instance_header, scheme_identification, text_concept
from engine.results.schema import AnswerBlock, Finding, LabelBlock, ModelRef, ResultRecord

_PROCEDURES = {"CT": ("25045-6", "LN", "CT unspecified body region"), "MR": ("25056-3", "LN", "MRI unspecified body region")}


def _concept(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


def finding_value(finding: Finding, mode: str):
    """The qualitative value of one label (see the module docstring)."""
    from pydicom.sr.codedict import codes

    if finding.abstain:
        return _concept("NOTASSESSED", "Not assessed: the model abstained")
    if finding.uncertain:
        return codes.SCT.Indeterminate
    if mode == "present-absent":
        present = finding.verdict == "present" if finding.verdict else finding.shown >= 0.5
        return codes.SCT.Present if present else codes.SCT.Absent
    return (
        _concept("TOPRANKED", "Most probable of the labels")
        if finding.rank == 1
        else _concept("LOWERRANKED", "Less probable than the top label")
    )


def _algorithm(model: ModelRef, params: list[str]):
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(name=model.name[:64], version=(model.revision or "unrecorded")[:64], parameters=params or None)


def _group(tracking: str, tracking_uid: str, concept, value, probability: float, algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking[:64]),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=codes.DCM.Probability, value=float(probability), unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept, value=value)],
    )


def label_groups(labels: LabelBlock, report_uid: str) -> list:
    algorithm = _algorithm(
        labels.model, parameters(mode=labels.mode, aggregation=labels.aggregation, prompt_set=labels.prompt_set, scope=labels.scope)
    )
    return [
        _group(
            f"MedLens label {f.rank}: {f.label}",
            derived_uid(report_uid, "label", str(f.rank)),
            text_concept(f.label, "L"),
            finding_value(f, labels.mode),
            f.shown,
            algorithm,
        )
        for f in labels.findings
    ]


def answer_groups(answers: list[AnswerBlock], report_uid: str) -> list:
    from pydicom.sr.codedict import codes

    groups = []
    for n, a in enumerate(answers, start=1):
        value = (
            _concept("NOTASSESSED", "Not assessed: the model abstained")
            if a.abstain
            else (codes.SCT.Indeterminate if a.uncertain else text_concept(a.answer, "A"))
        )
        algorithm = _algorithm(a.model, parameters(question="closed" if a.closed else "generated", family=a.family))
        groups.append(
            _group(
                f"MedLens answer {n}: {a.question}",
                derived_uid(report_uid, "answer", str(n)),
                text_concept(a.question, "Q"),
                value,
                a.shown,
                algorithm,
            )
        )
    return groups


def _procedure(modality: str):
    from highdicom.sr import CodedConcept

    value, scheme, meaning = _PROCEDURES.get(modality, ("363679005", "SCT", "Imaging procedure"))
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def build_sr(record: ResultRecord, sources: list, series_uid: str, sop_uid: str, modality: str):
    """The Comprehensive 3D SR of `record`; `sources` are the source image datasets (engine.results.subject stand-ins)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    groups = (label_groups(record.labels, sop_uid) if record.labels else []) + answer_groups(record.answers, sop_uid)
    if not groups:
        raise ValueError("nothing to report: no label and no answer")
    models = record.models
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("medlens-device", *(m.id for m in models)),
        name="MedLens",
        manufacturer_name="MedLens",
        model_name=" + ".join(m.name for m in models)[:64],
    )
    observation = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=_procedure(modality),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        **instance_header("sr", series_uid, sop_uid),
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.CodingSchemeIdentificationSequence = [scheme_identification()]
    return sr


def _texts(item) -> dict[str, list[str]]:
    """TEXT children of a content item by concept meaning (the algorithm identification rows)."""
    out: dict[str, list[str]] = {}
    for child in item.get("ContentSequence") or []:
        if child.ValueType == "TEXT":
            out.setdefault(child.ConceptNameCodeSequence[0].CodeMeaning, []).append(str(child.TextValue))
    return out


def read_findings(path_or_dataset) -> list[dict]:
    """Each measurement group of a MedLens SR as {"finding", "value", "probability", "algorithm", "version"} (tests, tools)."""
    import highdicom as hd

    sr = (
        hd.sr.srread(path_or_dataset)
        if not hasattr(path_or_dataset, "ContentSequence")
        else hd.sr.Comprehensive3DSR.from_dataset(path_or_dataset)
    )
    out = []
    for group in sr.content.get_image_measurement_groups():
        [measurement] = group.get_measurements()
        [evaluation] = group.get_qualitative_evaluations()
        texts = _texts(measurement[0])
        out.append(
            {
                "finding": group.finding_type.meaning,
                "value": evaluation.value.meaning,
                "probability": float(measurement.value),
                "algorithm": (texts.get("Algorithm Name") or [None])[0],
                "version": (texts.get("Algorithm Version") or [None])[0],
            }
        )
    return out
