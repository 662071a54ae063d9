"""engine.results without a server: evidence on the source grid, SR/SEG/SC from files (valid, de-identified), the JSON schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dciodvfy import dciodvfy_errors  # noqa: E402
from _dicom_synth import AXIAL, CORONAL, SAGITTAL, SeriesSpec, rotate, rotation, write_series  # noqa: E402
from _orthanc import PHI_STRINGS, synthetic_datasets, with_phi  # noqa: E402

from engine.deid import map_uid  # noqa: E402
from engine.io import load  # noqa: E402
from engine.results import Heat, export_scan, label_heat, record_for, subject_for  # noqa: E402
from engine.results.evidence import frame_of, place  # noqa: E402
from engine.results.sr import read_findings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBLIQUE = rotate(AXIAL, rotation("z", 25.0) @ rotation("x", 15.0))


def _pixels_by_mapped_uid(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        out[map_uid(ds.SOPInstanceUID)] = ds.pixel_array.astype(np.float32)
    return out


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, SAGITTAL, OBLIQUE], ids=["axial", "coronal", "sagittal", "oblique"])
@pytest.mark.parametrize("heat_axis", ["acquisition", 0])
def test_every_source_instance_gets_its_own_pixels_back(tmp_path, orientation, heat_axis):
    """Heat = the scan's own voxels: each instance's SEG frame must equal that instance's pixels (unique values per voxel)."""
    write_series(tmp_path, SeriesSpec(orientation=orientation))
    scan = load([tmp_path]).scans[0]
    subject = subject_for(scan, [tmp_path])
    assert subject is not None and not subject.identified
    top = float(scan.voxels.max())
    placements = [place(scan, ref) for ref in subject.instances]
    assert all(p is not None for p in placements), "every instance is a slice of the scan"
    axis = placements[0].axis if heat_axis == "acquisition" else heat_axis
    planes = {k: np.take(scan.voxels, k, axis=axis) / top for k in range(scan.voxels.shape[axis])}
    heat = Heat("label 'x'", "label", "gradcam", axis, planes)
    pixels = _pixels_by_mapped_uid(tmp_path)
    for placement in placements:
        frame = frame_of(heat, placement)
        expected = pixels[placement.ref.sop_instance_uid] / top
        np.testing.assert_array_equal(frame, expected)


def test_an_instance_of_another_scan_is_not_placed(tmp_path):
    write_series(tmp_path / "a", SeriesSpec(orientation=AXIAL))
    write_series(tmp_path / "b", SeriesSpec(orientation=CORONAL, seed=1))
    axial, coronal = load([tmp_path / "a"]).scans[0], load([tmp_path / "b"]).scans[0]
    for ref in subject_for(coronal, [tmp_path / "b"]).instances:
        assert place(axial, ref) is None


def _export(tmp_path: Path, tiny: str, mode: str = "softmax"):
    from engine.zeroshot import label_scan, resolve_model

    files = tmp_path / "files"
    files.mkdir()
    for i, ds in enumerate(with_phi(synthetic_datasets(tmp_path / "raw", 6))):
        ds.save_as(files / f"{i}.dcm", enforce_file_format=True)
    scan = load([files]).scans[0]
    model = resolve_model(tiny)
    result = label_scan(scan, ["liver", "lung", "kidney"], model, mode=mode, n_slices=4)
    record = record_for(scan, labels=result.to_dict())
    heat = label_heat(scan, record.labels.top.label, model, indices=[s.index for s in result.per_slice])
    outputs = export_scan(scan, record, [heat], tmp_path / "out", paths=[files])
    return scan, result, record, outputs, tmp_path / "out", files


def test_export_from_files_writes_valid_deidentified_sr_seg_and_overlay(tmp_path, tiny):
    scan, result, record, outputs, out, files = _export(tmp_path, tiny)
    assert outputs.kinds() == ["SR", "SEG", "SC"] and outputs.notes == []
    for name in ("sr.dcm", "seg.dcm", "sc.dcm"):
        assert dciodvfy_errors(out / name) == [], name
    source = pydicom.dcmread(next(files.iterdir()))
    real = {source.StudyInstanceUID, source.SeriesInstanceUID, source.FrameOfReferenceUID}
    for name in ("sr.dcm", "seg.dcm", "sc.dcm", "result.json"):
        raw = (out / name).read_bytes().decode("latin-1")
        assert not [s for s in PHI_STRINGS if s in raw], f"{name} carries patient data"
        assert not [u for u in real if u in raw], f"{name} carries a real UID"
    for name in ("sr.dcm", "seg.dcm", "sc.dcm"):
        ds = pydicom.dcmread(out / name)
        assert "research use, not for diagnosis" in ds.SeriesDescription
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID == map_uid(source.StudyInstanceUID)  # the library's mapping
        assert any(record.labels.model.revision in str(v) for v in ds.SoftwareVersions)
    # the SR references every source instance, under the mapping
    sr = pydicom.dcmread(out / "sr.dcm")
    referenced = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert referenced == {map_uid(pydicom.dcmread(f).SOPInstanceUID) for f in files.iterdir()}
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.SegmentationType == "FRACTIONAL" and int(seg.NumberOfFrames) == len(record.evidence[0].slices)


def test_sr_findings_equal_the_json_result(tmp_path, tiny):
    _scan, result, _record, _outputs, out, _files = _export(tmp_path, tiny, mode="present-absent")
    data = json.loads((out / "result.json").read_text())
    findings = read_findings(out / "sr.dcm")
    assert [f["finding"] for f in findings] == [f["label"] for f in data["labels"]["findings"]]
    # the SR carries what MedLens reports (calibrated, bounded by the field-of-view check) and its verdict
    assert [f["probability"] for f in findings] == pytest.approx([f["reported_probability"] for f in data["labels"]["findings"]], abs=1e-6)
    assert [f["probability"] for f in findings] == pytest.approx([s.shown for s in result.labels], abs=1e-6)
    words = {"present": "Present", "absent": "Absent", "uncertain": "Indeterminate"}
    if data["labels"]["out_of_distribution"]:  # the random tiny model misreads the CT's modality: it abstains
        assert data["labels"]["ood_reasons"] and all(f["abstain"] for f in data["labels"]["findings"])
        assert {f["value"] for f in findings} == {"Not assessed: the model abstained"}
    else:
        assert [f["value"] for f in findings] == [words[s.verdict] for s in result.labels]
    assert {f["version"] for f in findings} == {data["labels"]["model"]["revision"]}


def test_json_result_follows_the_documented_schema(tmp_path, tiny):
    import jsonschema

    _scan, _result, _record, _outputs, out, _files = _export(tmp_path, tiny)
    schema = json.loads((ROOT / "docs" / "result.schema.json").read_text())
    data = json.loads((out / "result.json").read_text())
    jsonschema.validate(data, schema)
    finding = data["labels"]["findings"][0]
    assert {"calibrated_probability", "reported_probability", "verdict", "uncertain", "abstain"} <= set(finding)
    # the tiny test model has no trust block: raw numbers, "not calibrated", a verdict all the same
    assert finding["calibrated_probability"] is None and isinstance(finding["uncertain"], bool)
    assert data["labels"]["calibrated"] is False and data["labels"]["trust"].startswith("not calibrated")
    assert data["labels"]["model"]["name"].startswith("local-dir:") and "/" not in data["labels"]["model"]["name"]


def test_uncertain_and_abstained_findings_are_not_claimed_present(tmp_path, tiny):
    from engine.results.schema import Finding
    from engine.results.sr import finding_value

    assert finding_value(Finding("x", 1, 0.9, uncertain=True), "present-absent").meaning == "Indeterminate"
    assert "abstained" in finding_value(Finding("x", 1, 0.9, abstain=True), "present-absent").meaning
    assert finding_value(Finding("x", 1, 0.9), "present-absent").meaning == "Present"
    assert finding_value(Finding("x", 2, 0.3), "softmax").meaning == "Less probable than the top label"


def test_a_scan_without_dicom_gets_json_and_says_why_no_dicom(tmp_path, tiny):
    import nibabel as nib

    from engine.zeroshot import label_scan

    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    scan = load([tmp_path / "v.nii.gz"]).scans[0]
    result = label_scan(scan, ["a", "b"], tiny, n_slices=2)
    outputs = export_scan(scan, record_for(scan, labels=result.to_dict()), [], tmp_path / "out", paths=[tmp_path / "v.nii.gz"])
    assert outputs.kinds() == [] and "no DICOM objects" in outputs.notes[0]
    data = json.loads((tmp_path / "out" / "result.json").read_text())
    assert data["dicom"]["sr"] is None and data["dicom"]["notes"]


def test_identified_objects_are_never_written_to_files(tmp_path):
    from engine.results.export import ExportError, Outputs, write_files

    ds = pydicom.Dataset()
    ds.PatientName = "Quoxxa^Zyxlenn"
    with pytest.raises(ExportError, match="de-identified"):
        write_files(tmp_path, record_for(load([_tiny_png(tmp_path)]).scans[0]), Outputs(sr=ds))


def _tiny_png(folder: Path) -> Path:
    from PIL import Image

    path = folder / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    return path


def test_an_identified_subject_without_birth_date_or_sex_still_builds_every_object(tmp_path, tiny):
    """PACS headers often lack type 2 attributes (birth date, sex, referring physician): they are written empty."""
    from pydicom.dataset import Dataset

    from engine.pacs.origin import InstanceRef
    from engine.results import OutputUIDs, Subject, build_outputs

    files = tmp_path / "files"
    write_series(files, SeriesSpec(modality="CT"))
    scan = load([files]).scans[0]
    datasets = [pydicom.dcmread(f) for f in files.iterdir()]
    header = Dataset()
    header.PatientID, header.PatientName = "ONLY-AN-ID", "Only^Name"
    subject = Subject(header, datasets[0].StudyInstanceUID, tuple(InstanceRef.from_dataset(d) for d in datasets), identified=True)
    record = record_for(scan, labels={"labels": [{"label": "a", "probability": 0.7}, {"label": "b", "probability": 0.3}]})
    heat = Heat("label 'a'", "label", "gradcam", 0, {3: np.ones(scan.voxels.shape[1:], np.float32)})
    outputs = build_outputs(scan, record, subject, [heat], OutputUIDs.new())
    assert outputs.kinds() == ["SR", "SEG", "SC"]
    assert outputs.sr.PatientID == "ONLY-AN-ID" and outputs.sr.PatientBirthDate == ""


def test_a_single_image_exports_valid_objects_on_its_own_grid(tmp_path, tiny):
    """A 2D scan (one DICOM image): the SEG has one frame, the image's own; everything validates."""
    from engine.zeroshot import label_scan, resolve_model

    [ds] = with_phi(synthetic_datasets(tmp_path / "raw", 1))
    ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
    scan = load([tmp_path / "one.dcm"]).scans[0]
    assert scan.is_2d
    model = resolve_model(tiny)
    result = label_scan(scan, ["liver", "lung"], model)
    record = record_for(scan, labels=result.to_dict())
    heat = label_heat(scan, record.labels.top.label, model)
    outputs = export_scan(scan, record, [heat], tmp_path / "out", paths=[tmp_path / "one.dcm"])
    assert outputs.kinds() == ["SR", "SEG", "SC"], outputs.notes
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    assert int(seg.NumberOfFrames) == 1 and (seg.Rows, seg.Columns) == (ds.Rows, ds.Columns)
    for name in ("sr.dcm", "seg.dcm", "sc.dcm"):
        assert dciodvfy_errors(tmp_path / "out" / name) == [], name
