"""Geometry acceptance: our DICOM reader against dcm2niix, the reference converter.

What is compared, every time: our NIfTI (from `medlens convert`, or built
from the in-memory `Scan` as the Scan docstring promises) and dcm2niix's,
both brought to RAS+ with nibabel's `as_closest_canonical`: same shape,
identical voxel values after scaling (nibabel's `get_fdata`), affines equal
within 1e-3 mm. When the values differ, the failure message says which
flip / axis permutation / volume order of ours would have matched, which
is usually the whole diagnosis of a geometry bug.

Two sources of series:
1. dcm2niix's own regression data (dcm_qa_nih: GE 4D EPI, Siemens mosaics)
   under ../shared/data with its reference NIfTIs in Ref/ (skipped when
   ../shared is absent).
2. Series written here with pydicom (tests/_dicom_synth.py) in many
   orientations, converted by the dcm2niix binary that the `dcm2niix` PyPI
   package ships (skipped when that package is not installed).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.scan import STORAGE_DTYPES

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dicom_synth as synth  # noqa: E402

ATOL_MM = 1e-3
QA_NIH = Path("dicom_reference") / "dcm_qa_nih"
# Every series folder of dcm_qa_nih/In; test_every_reference_series_is_listed keeps this complete.
QA_NIH_SERIES = [
    "20180918GE/mr_0004",
    "20180918GE/mr_0005",
    "20180918GE/mr_0006",
    "20180918GE/mr_0007",
    "20180918Si/mr_0003",
    "20180918Si/mr_0004",
    "20180918Si/mr_0005",
    "20180918Si/mr_0006",
]


# --- helpers ------------------------------------------------------------------
def dcm2niix_binary() -> Path:
    """The dcm2niix executable shipped by the `dcm2niix` PyPI package (never looked up on PATH)."""
    try:
        import dcm2niix  # type: ignore
    except ImportError:
        dcm2niix = None
    candidates = []
    if dcm2niix is not None:
        candidates.append(Path(getattr(dcm2niix, "bin", "")))
        candidates.append(Path(dcm2niix.__file__).resolve().parent / "dcm2niix")
    candidates.append(Path(sys.executable).parent / "dcm2niix")  # console script wrapper
    for cand in candidates:
        if cand.name and cand.is_file() and cand.stat().st_mode & 0o111:
            return cand
    pytest.skip("the dcm2niix package (PyPI `dcm2niix`) is not installed in this environment")


def run_dcm2niix(series_dir: Path, out_dir: Path):
    """Convert one folder with dcm2niix; return the single NIfTI it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(dcm2niix_binary()), "-z", "n", "-b", "n", "-f", "out", "-o", str(out_dir), str(series_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"dcm2niix failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}"
    outputs = sorted(out_dir.glob("*.nii"))
    assert len(outputs) == 1, f"dcm2niix wrote {[p.name for p in outputs]} for {series_dir.name}:\n{proc.stdout}"
    return nib.load(outputs[0])


def cli_convert(paths: list[Path], out: Path, *extra: str):
    """`medlens convert PATH... -o OUT` in-process; returns the written image."""
    from engine.cli import main

    rc = main(["convert", *[str(p) for p in paths], "-o", str(out), *extra])
    assert rc == 0, f"medlens convert exited {rc}"
    assert out.is_file(), "medlens convert reported success but wrote no file"
    return nib.load(out)


def load_scans(*paths: Path):
    from engine.io import load

    return load([str(p) for p in paths])


def scan_to_nifti(scan):
    """The Scan contract: voxels (z, y, x) / (t, z, y, x) reversed is NIfTI order."""
    vox = np.asarray(scan.voxels)
    assert vox.ndim in (3, 4), f"expected a volume, got voxels of shape {vox.shape}"
    data = vox.transpose(2, 1, 0) if vox.ndim == 3 else vox.transpose(3, 2, 1, 0)
    return nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(scan.affine, dtype=np.float64))


def canonical(img) -> tuple[np.ndarray, np.ndarray]:
    can = nib.as_closest_canonical(img)
    return np.asarray(can.get_fdata(dtype=np.float64)), np.asarray(can.affine, dtype=np.float64)


def _describe_match(ours: np.ndarray, ref: np.ndarray) -> str:
    """Which axis permutation / flips / volume reversal of ours would equal ref."""
    hits = []
    spatial = (0, 1, 2)
    names = "xyz"
    for perm in itertools.permutations(spatial):
        full_perm = perm + tuple(range(3, ours.ndim))
        moved = ours.transpose(full_perm)
        if moved.shape[:3] != ref.shape[:3]:
            continue
        time_options = [False, True] if ours.ndim == 4 else [False]
        for flips in itertools.product([False, True], repeat=3):
            for rev_t in time_options:
                cand = moved
                for ax, f in enumerate(flips):
                    if f:
                        cand = np.flip(cand, axis=ax)
                if rev_t:
                    cand = np.flip(cand, axis=3)
                if cand.shape == ref.shape and np.array_equal(cand, ref):
                    desc = []
                    if perm != spatial:
                        desc.append("ours' NIfTI axes (x,y,z) -> " + "".join(names[p] for p in perm))
                    flipped = [names[a] for a, f in enumerate(flips) if f]
                    if flipped:
                        desc.append("flipped along RAS axis " + ",".join(flipped))
                    if rev_t:
                        desc.append("volume (time) order reversed")
                    hits.append("; ".join(desc) or "identity")
    if hits:
        return "ours equals the reference after: " + " | ".join(hits)
    if ours.shape == ref.shape:
        diff = np.abs(ours - ref)
        ratio = ""
        nz = np.abs(ref) > 0
        if nz.any():
            r = ours[nz] / ref[nz]
            ratio = f"; ours/ref ratio range {r.min():.4g}..{r.max():.4g}"
        return (
            f"no flip/permutation matches; {int((diff > 0).sum())} of {diff.size} voxels differ, "
            f"max |diff| {diff.max():.4g}; ours range {ours.min():.4g}..{ours.max():.4g}, "
            f"ref range {ref.min():.4g}..{ref.max():.4g}{ratio}"
        )
    return "no flip/permutation matches"


def assert_same_image(ours_img, ref_img, what: str) -> None:
    ours, ours_aff = canonical(ours_img)
    ref, ref_aff = canonical(ref_img)
    assert ours.shape == ref.shape, (
        f"{what}: shape in RAS+ ours {ours.shape} vs dcm2niix {ref.shape} "
        f"(ours orientation {''.join(nib.aff2axcodes(ours_img.affine))}, "
        f"dcm2niix {''.join(nib.aff2axcodes(ref_img.affine))})"
    )
    if not np.array_equal(ours, ref):
        pytest.fail(f"{what}: voxel values differ from dcm2niix in RAS+: {_describe_match(ours, ref)}")
    if not np.allclose(ours_aff, ref_aff, atol=ATOL_MM, rtol=0):
        np.set_printoptions(precision=5, suppress=True)
        pytest.fail(
            f"{what}: affine in RAS+ differs from dcm2niix by up to {np.abs(ours_aff - ref_aff).max():.5g} mm\n"
            f"ours:\n{ours_aff}\ndcm2niix:\n{ref_aff}\ndifference:\n{ours_aff - ref_aff}"
        )


def assert_scan_contract(scan) -> None:
    """Promises of engine.scan.Scan that hold for any volume read from DICOM."""
    assert scan.voxels.dtype in STORAGE_DTYPES  # float32, or int16 holding the same integers (engine.scan)
    aff = np.asarray(scan.affine)
    assert aff.shape == (4, 4)
    assert tuple(nib.aff2axcodes(aff)) == ("R", "A", "S"), f"Scan is not in closest-canonical RAS+: axis codes {nib.aff2axcodes(aff)}"
    # spacing is per array axis (z, y, x): the affine's column norms reversed
    norms = np.linalg.norm(aff[:3, :3], axis=0)[::-1]
    assert np.allclose(scan.spacing, norms, atol=ATOL_MM), f"spacing {scan.spacing} vs affine column norms (z,y,x) {norms}"


# --- 1. dcm2niix's regression data ---------------------------------------------
def _qa_root(shared_data: Path) -> Path:
    root = shared_data / QA_NIH
    if not (root / "In").is_dir() or not (root / "Ref").is_dir():
        pytest.skip(f"{root} (dcm_qa_nih In/ and Ref/) is absent")
    return root


def _first_dicom(folder: Path) -> Path:
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() == ".dcm":
            return p
    for p in sorted(folder.iterdir()):
        if p.is_file():
            try:
                pydicom.dcmread(p, stop_before_pixels=True)
                return p
            except Exception:
                continue
    raise AssertionError(f"no DICOM file in {folder}")


def reference_nifti(root: Path, series_dir: Path) -> Path:
    """Map an In/ series folder to its Ref/ NIfTI via (ProtocolName, SeriesNumber) in the JSON sidecars."""
    ds = pydicom.dcmread(_first_dicom(series_dir), stop_before_pixels=True)
    key = (str(ds.ProtocolName), int(ds.SeriesNumber))
    matches = []
    for sidecar in sorted((root / "Ref").glob("*.json")):
        meta = json.loads(sidecar.read_text())
        if (str(meta.get("ProtocolName")), int(meta.get("SeriesNumber", -1))) == key:
            matches.append(sidecar.with_suffix(".nii"))
    assert len(matches) == 1, f"{series_dir}: expected one Ref NIfTI for {key}, found {matches}"
    assert matches[0].is_file()
    return matches[0]


def test_every_reference_series_is_listed(shared_data):
    root = _qa_root(shared_data)
    present = sorted(
        f"{vendor.name}/{series.name}"
        for vendor in (root / "In").iterdir()
        if vendor.is_dir()
        for series in vendor.iterdir()
        if series.is_dir()
    )
    assert present == sorted(QA_NIH_SERIES)


@pytest.mark.parametrize("series", QA_NIH_SERIES)
def test_reference_series_cli_matches_dcm2niix(shared_data, tmp_path, series):
    root = _qa_root(shared_data)
    series_dir = root / "In" / series
    ref = nib.load(reference_nifti(root, series_dir))
    ours = cli_convert([series_dir], tmp_path / "ours.nii.gz")
    assert_same_image(ours, ref, f"medlens convert {series}")


@pytest.mark.parametrize("series", QA_NIH_SERIES)
def test_reference_series_load_matches_dcm2niix(shared_data, series):
    root = _qa_root(shared_data)
    series_dir = root / "In" / series
    ref = nib.load(reference_nifti(root, series_dir))
    result = load_scans(series_dir)
    assert len(result.scans) == 1, f"{series}: expected one series, got {len(result.scans)}: {[s.label for s in result.scans]}"
    scan = result.scans[0]
    assert_scan_contract(scan)
    assert scan.n_volumes == (ref.shape[3] if len(ref.shape) == 4 else 1)
    assert_same_image(scan_to_nifti(scan), ref, f"load({series})")


# --- 2. synthetic series through the dcm2niix binary ---------------------------
OBLIQUE_X = synth.rotate(synth.AXIAL, synth.rotation("x", 25))  # axial tilted towards coronal
OBLIQUE_YZ = synth.rotate(synth.AXIAL, synth.rotation("z", 30) @ synth.rotation("y", -20))  # double oblique
OBLIQUE_SAG = synth.rotate(synth.SAGITTAL, synth.rotation("z", 15))  # sagittal oblique
OBLIQUE_COR = synth.rotate(synth.CORONAL, synth.rotation("x", -18) @ synth.rotation("z", 12))

SYNTH_CASES = {
    "axial": synth.SeriesSpec(),
    "coronal": synth.SeriesSpec(orientation=synth.CORONAL),
    "sagittal": synth.SeriesSpec(orientation=synth.SAGITTAL),
    "oblique_about_x": synth.SeriesSpec(orientation=OBLIQUE_X),
    "oblique_about_z_and_y": synth.SeriesSpec(orientation=OBLIQUE_YZ),
    "oblique_sagittal": synth.SeriesSpec(orientation=OBLIQUE_SAG),
    "oblique_coronal_descending": synth.SeriesSpec(orientation=OBLIQUE_COR, descending=True),
    "axial_descending": synth.SeriesSpec(descending=True),
    "sagittal_descending": synth.SeriesSpec(orientation=synth.SAGITTAL, descending=True),
    "axial_prone_flipped_rows_cols": synth.SeriesSpec(orientation=((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0))),
    "portrait_rows_gt_columns": synth.SeriesSpec(rows=32, columns=24, pixel_spacing=(0.6, 0.9)),
    "ct_hu_intercept": synth.SeriesSpec(modality="CT", rescale_intercept=-1024.0),
    "ct_slope_and_intercept_descending": synth.SeriesSpec(
        modality="CT", rescale_slope=2.0, rescale_intercept=-1024.0, descending=True, orientation=synth.CORONAL
    ),
    # some scanners vary RescaleIntercept per slice; dcm2niix then writes float32
    "ct_intercept_varies_per_slice": synth.SeriesSpec(
        modality="CT", per_slice_intercepts=tuple(-1024.0 - 10.0 * k for k in range(12)), orientation=OBLIQUE_X
    ),
    "mr_rescale_slope_intercept": synth.SeriesSpec(rescale_slope=0.5, rescale_intercept=10.0),
    "mr_unsigned_above_32767": synth.SeriesSpec(unsigned=True, value_offset=40000),
    "two_slices_sagittal_descending": synth.SeriesSpec(n_slices=2, orientation=synth.SAGITTAL, descending=True),
    "thin_slices_0.3mm": synth.SeriesSpec(slice_spacing=0.3, orientation=OBLIQUE_SAG),
    # scanners write IOP with float noise that differs between slices of one stack
    "oblique_with_iop_noise": synth.SeriesSpec(orientation=OBLIQUE_X, iop_jitter=2e-6),
}


@pytest.fixture(scope="module")
def synth_case(tmp_path_factory):
    """(series folder, dcm2niix image, spec) for one case, built once per module."""
    cache = {}

    def build(name: str):
        if name not in cache:
            spec = SYNTH_CASES[name]
            base = tmp_path_factory.mktemp(f"synth_{name}")
            written = synth.write_series(base / "series", spec)
            ref = run_dcm2niix(written.folder, base / "dcm2niix")
            cache[name] = (written.folder, ref, spec)
        return cache[name]

    return build


def test_synthetic_series_are_written_as_intended(tmp_path):
    """The helper itself: shuffled names, descending instance numbers, true-normal positions."""
    spec = synth.SeriesSpec(orientation=OBLIQUE_YZ, descending=True)
    written = synth.write_series(tmp_path, spec)
    dss = [pydicom.dcmread(p) for p in written.files]
    normal = np.cross(np.asarray(spec.orientation[0]), np.asarray(spec.orientation[1]))
    by_name = sorted(zip([p.name for p in written.files], dss), key=lambda t: t[0])
    proj = [float(np.dot(np.asarray(d.ImagePositionPatient, float), normal)) for _, d in by_name]
    assert proj != sorted(proj) and proj != sorted(proj, reverse=True), "file names must not sort by position"
    by_instance = sorted(dss, key=lambda d: int(d.InstanceNumber))
    proj = [float(np.dot(np.asarray(d.ImagePositionPatient, float), normal)) for d in by_instance]
    assert np.all(np.diff(proj) < 0), "descending: positions decrease with InstanceNumber"
    assert np.allclose(-np.diff(proj), spec.slice_spacing, atol=1e-6)
    # positions lie on the normal through the origin (no gantry tilt)
    offsets = np.array([np.asarray(d.ImagePositionPatient, float) for d in by_instance]) - np.asarray(spec.origin)
    assert np.allclose(np.cross(offsets, normal), 0, atol=1e-6)
    assert dss[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert dss[0].pixel_array.shape == (spec.rows, spec.columns)


@pytest.mark.parametrize("case", list(SYNTH_CASES))
def test_dcm2niix_reads_synthetic_series_as_expected(synth_case, case):
    """Sanity of the reference itself: dcm2niix agrees with the geometry computed from the headers here."""
    folder, ref, spec = synth_case(case)
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ synth.lps_affine(spec)  # LPS -> RAS
    values = synth.physical_values(spec)
    exp_img = nib.Nifti1Image(values.transpose(2, 1, 0), expected)
    assert_same_image(ref, exp_img, f"dcm2niix vs header geometry ({case})")


@pytest.mark.parametrize("case", list(SYNTH_CASES))
def test_synthetic_series_load_matches_dcm2niix(synth_case, case):
    folder, ref, spec = synth_case(case)
    result = load_scans(folder)
    assert len(result.scans) == 1, (
        f"{case}: expected one series, got {[s.label for s in result.scans]}; warnings {[s.provenance.warnings for s in result.scans]}"
    )
    scan = result.scans[0]
    assert_scan_contract(scan)
    assert scan.voxels.ndim == 3
    assert scan.modality.value == spec.modality
    if spec.modality == "CT":
        expected_min = float(synth.physical_values(spec).min())
        assert float(scan.voxels.min()) == expected_min, "CT voxels must be in HU (rescale applied)"
    assert_same_image(scan_to_nifti(scan), ref, f"load({case})")


@pytest.mark.parametrize("case", list(SYNTH_CASES))
def test_synthetic_series_cli_matches_dcm2niix(synth_case, tmp_path, case):
    folder, ref, _ = synth_case(case)
    ours = cli_convert([folder], tmp_path / "ours.nii.gz")
    assert_same_image(ours, ref, f"medlens convert {case}")


def test_cli_accepts_individual_files(synth_case, tmp_path):
    """PATH... may be the files themselves, in any order."""
    folder, ref, _ = synth_case("oblique_about_x")
    files = sorted(folder.iterdir())
    ours = cli_convert(files, tmp_path / "ours.nii")
    assert_same_image(ours, ref, "medlens convert FILE...")


def test_iop_noise_across_a_rounding_boundary_keeps_one_series(tmp_path):
    """IOP noise of 2e-6 must not split a stack, wherever the true value lies.

    The stack is tilted so that one direction cosine is 0.12345, and the slices
    alternate between 0.123448 and 0.123452: any grouping that rounds IOP to 4
    decimals puts them in different groups (0.1234 vs 0.1235). dcm2niix makes
    one 12-slice volume; so must we (group by angle between normals instead).
    """
    theta = np.degrees(np.arcsin(0.12345))
    spec = synth.SeriesSpec(orientation=synth.rotate(synth.AXIAL, synth.rotation("x", theta)), iop_jitter=2e-6)
    written = synth.write_series(tmp_path / "series", spec)
    ref = run_dcm2niix(written.folder, tmp_path / "dcm2niix")
    assert ref.shape == (spec.columns, spec.rows, spec.n_slices)
    result = load_scans(written.folder)
    assert len(result.scans) == 1, (
        f"one 12-slice stack was split into {len(result.scans)} scans "
        f"{[s.voxels.shape for s in result.scans]}; warnings {[s.provenance.warnings for s in result.scans]}"
    )
    assert_same_image(scan_to_nifti(result.scans[0]), ref, "IOP noise across a rounding boundary")


ENHANCED_CASES = {
    "enhanced_axial": synth.SeriesSpec(),
    "enhanced_oblique_descending": synth.SeriesSpec(orientation=OBLIQUE_YZ, descending=True),
    "enhanced_sagittal_descending_rescaled": synth.SeriesSpec(
        orientation=synth.SAGITTAL, descending=True, rescale_slope=0.5, rescale_intercept=3.0
    ),
}


@pytest.mark.parametrize("case", list(ENHANCED_CASES))
def test_enhanced_multiframe_matches_dcm2niix(tmp_path, case):
    """One Enhanced MR file (per-frame positions, shared orientation/spacing/rescale)."""
    spec = ENHANCED_CASES[case]
    path = synth.write_enhanced(tmp_path / "in" / "enhanced.dcm", spec)
    ref = run_dcm2niix(path.parent, tmp_path / "dcm2niix")
    result = load_scans(path)
    assert len(result.scans) == 1, f"{case}: got {[s.label for s in result.scans]}; skipped {result.skipped}"
    scan = result.scans[0]
    assert_scan_contract(scan)
    assert_same_image(scan_to_nifti(scan), ref, f"load({case})")
    assert_same_image(cli_convert([path], tmp_path / "ours.nii.gz"), ref, f"medlens convert {case}")


def test_enhanced_multiframe_with_shuffled_frames_follows_positions(tmp_path):
    """Frames stored out of spatial order: geometry must follow the per-frame positions.

    Compared with the geometry computed from the headers, not with dcm2niix,
    which (v1.0.20260724) takes the wrong origin / slice direction here.
    """
    spec = synth.SeriesSpec(orientation=OBLIQUE_SAG, descending=True)
    path = synth.write_enhanced(tmp_path / "enhanced.dcm", spec, shuffle_frames=True)
    scan = load_scans(path).scans[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ synth.lps_affine(spec)
    expected = nib.Nifti1Image(synth.physical_values(spec).transpose(2, 1, 0), ras)
    assert_same_image(scan_to_nifti(scan), expected, "enhanced, shuffled frames")


# --- 3. irregular series -------------------------------------------------------
def test_missing_slice_warns(tmp_path):
    spec = synth.SeriesSpec(skip_slices=(5,), orientation=OBLIQUE_X)
    synth.write_series(tmp_path / "gap", spec)
    result = load_scans(tmp_path / "gap")
    assert len(result.scans) == 1, f"a series with one missing slice should stay one scan, got {len(result.scans)}"
    scan = result.scans[0]
    warnings = " ".join(scan.provenance.warnings).lower()
    assert any(word in warnings for word in ("gap", "spacing", "missing")), (
        f"no warning about the gap between slices 4 and 6; warnings: {scan.provenance.warnings}"
    )


def test_missing_slice_is_resampled_onto_the_acquired_grid(tmp_path):
    """A gap is filled by interpolation on the regular acquisition grid, so every real slice
    sits exactly where it was acquired (dcm2niix's "_Eq" volume instead stretches the step to
    27.5/12 mm, moving real slices; we compare with the complete series' header geometry)."""
    spec = synth.SeriesSpec(skip_slices=(5,), orientation=OBLIQUE_X)
    synth.write_series(tmp_path / "gap", spec)
    full = synth.SeriesSpec(orientation=OBLIQUE_X)
    scan = load_scans(tmp_path / "gap").scans[0]
    ours, ours_affine = canonical(scan_to_nifti(scan))
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ synth.lps_affine(full)
    ref, ref_affine = canonical(nib.Nifti1Image(synth.physical_values(full).transpose(2, 1, 0).astype(np.float64), ras))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours_affine, ref_affine, atol=1e-3)
    # The synthetic values are linear in the slice index, so linear interpolation of the
    # missing slice reproduces it exactly: the whole volume equals the complete series.
    np.testing.assert_array_equal(ours, ref)
    assert "resampled to a regular 2.5 mm grid" in " ".join(scan.provenance.warnings)


def _write_localizer(tmp_path: Path) -> tuple[Path, dict]:
    """A tri-plane localizer (3 slices per plane, one SeriesInstanceUID) and dcm2niix's NIfTI per plane."""
    series_uid = pydicom.uid.generate_uid()
    study_uid = pydicom.uid.generate_uid()
    planes = {
        "axial": synth.SeriesSpec(orientation=synth.AXIAL, origin=(-10.0, -8.0, 20.0)),
        "coronal": synth.SeriesSpec(orientation=synth.CORONAL, origin=(-10.0, 3.0, 30.0)),
        "sagittal": synth.SeriesSpec(orientation=synth.SAGITTAL, origin=(4.0, -8.0, 30.0)),
    }
    all_dir = tmp_path / "localizer"
    all_dir.mkdir()
    refs = {}
    for i, (name, spec) in enumerate(planes.items()):
        spec.n_slices = 3
        spec.series_uid, spec.study_uid = series_uid, study_uid
        spec.instance_offset = 3 * i
        spec.seed = i
        written = synth.write_series(tmp_path / f"only_{name}", spec)
        for f in written.files:
            shutil.copy(f, all_dir / f.name)
        refs[name] = run_dcm2niix(written.folder, tmp_path / f"ref_{name}")
    return all_dir, refs


def _match_reference(scans_as_nifti: list, ref):
    """The one image among scans_as_nifti whose RAS+ affine is dcm2niix's (None if not exactly one)."""
    _, ref_aff = canonical(ref)
    hits = [img for img in scans_as_nifti if np.allclose(canonical(img)[1], ref_aff, atol=ATOL_MM)]
    return hits[0] if len(hits) == 1 else None


def test_localizer_with_three_planes_splits_into_three_scans(tmp_path):
    """Three orientations sharing one SeriesInstanceUID (a tri-plane localizer) are three scans."""
    all_dir, refs = _write_localizer(tmp_path)
    result = load_scans(all_dir)
    assert len(result.scans) == 3, (
        f"expected one scan per plane, got {len(result.scans)}: {[s.label for s in result.scans]}; skipped: {result.skipped}"
    )
    images = [scan_to_nifti(s) for s in result.scans]
    for name, ref in refs.items():
        hit = _match_reference(images, ref)
        assert hit is not None, f"{name} plane: no scan (or several) with dcm2niix's affine\n{canonical(ref)[1]}"
        assert_same_image(hit, ref, f"localizer {name} plane")


def test_cli_series_option_picks_each_plane(tmp_path, capsys):
    all_dir, refs = _write_localizer(tmp_path)
    from engine.cli import main

    capsys.readouterr()
    rc = main(["convert", str(all_dir), "-o", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, f"several series without --series: rc {rc}, stderr {err}"
    assert "--series" in err[0]
    written = [cli_convert([all_dir], tmp_path / f"series{i}.nii.gz", "--series", str(i)) for i in range(3)]
    for name, ref in refs.items():
        hit = _match_reference(written, ref)
        assert hit is not None, f"{name} plane: no --series N output has dcm2niix's affine"
        assert_same_image(hit, ref, f"medlens convert --series (localizer {name} plane)")
