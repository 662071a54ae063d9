"""Mutated DICOM and NIfTI files never crash, hang or leak an exception out of `load`.

A small version of `bench/fuzz_readers.py` (which runs 2,000+ cases and
records the table in bench/results/fuzz.md): same seeds, same mutations
(truncation, byte flips, tag deletion, hostile header values), same checks.
Allowed outcomes per mutated file: at least one Scan, or a ScanError whose
message names the file and the problem; each read under 5 s. Reads run in a
worker process (tests/_mutate.py), so a native decoder that aborts shows up
as a failing case instead of killing the test session.

`test_hostile_header_does_not_kill_the_process` pins down, one by one, the
header values that made a native decoder abort the whole process during
fuzzing (GDCM throws a C++ exception nobody catches: std::terminate).
"""

from __future__ import annotations

import io
from collections import Counter

import pydicom
import pytest

import _mutate as mz

N_CASES = 150  # ~3 s; the full run is bench/fuzz_readers.py
BASE_SEED = 1234


def _report(outcomes, info) -> str:
    by_status = Counter(o.status for o in outcomes)
    by_kind = Counter((o.kind, o.status) for o in outcomes)
    worst = max(outcomes, key=lambda o: o.secs)
    lines = [
        f"{len(outcomes)} cases: {dict(by_status)}; slowest {worst.secs:.2f} s ({worst.seed}, {worst.detail});"
        f" worker restarts {info['worker_restarts']}, worker peak RSS {info['max_worker_rss_kb'] / 1024:.0f} MB"
    ]
    lines += [f"  {kind:15s} {status:11s} {n}" for (kind, status), n in sorted(by_kind.items())]
    return "\n".join(lines)


def _failures(outcomes) -> str:
    out = []
    for o in outcomes:
        if o.failed:
            out.append(f"case {o.index} [{o.seed}, {o.detail}]: " + "; ".join(o.problems))
            if o.traceback:
                out.append("    " + o.traceback.strip().splitlines()[-1][:300])
    return "\n".join(out)


def _check(seeds, n, base_seed):
    outcomes, info = mz.run_fuzz(seeds, n, base_seed, hang_s=30.0)
    print(_report(outcomes, info))
    assert len(outcomes) == n
    failures = _failures(outcomes)
    assert not failures, (
        f"mutated files broke the loader (reproduce one with: python tests/_mutate.py reproduce INDEX --seed {base_seed}):\n{failures}"
    )
    return outcomes


def test_fuzz_package_seeds():
    seeds = mz.default_seeds(include_shared=False)
    assert sum(s.fmt == "dicom" for s in seeds) >= 10 and sum(s.fmt == "nifti" for s in seeds) >= 4
    outcomes = _check(seeds, N_CASES, BASE_SEED)
    kinds = {o.kind for o in outcomes}
    assert kinds == {"truncate", "flip", "delete_tag", "corrupt_value", "corrupt_header"}
    # Not everything is refused: mild mutations (a flipped pixel byte) must still load.
    assert sum(o.status == "scan" for o in outcomes) >= N_CASES // 10


def test_fuzz_shared_data_seeds(shared_data):
    seeds = [s for s in mz.default_seeds(include_shared=True) if s.name.startswith("shared:")]
    if not seeds:
        pytest.skip("no DICOM/NIfTI seed found under shared data")
    _check(seeds, 30, BASE_SEED)


def test_mutations_are_reproducible():
    seeds = mz.default_seeds(include_shared=False)
    a = mz.make_case(seeds, 17, BASE_SEED)
    b = mz.make_case(seeds, 17, BASE_SEED)
    assert (a.seed, a.kind, a.detail, a.data) == (b.seed, b.kind, b.detail, b.data)
    assert mz.make_case(seeds, 17, BASE_SEED + 1).data != a.data or a.kind == "delete_tag"


# Header values that are wrong for the compressed stream they describe. During
# fuzzing, the first seven aborted the Python process inside GDCM (a C++
# exception reaching std::terminate, exit by SIGABRT): in the app that is the
# whole server gone because of one uploaded file.
HOSTILE = [
    ("MR_small_jpeg_ls_lossless.dcm", "Rows", 4096),  # JPEG-LS, larger than the codestream
    ("JPEGLSNearLossless_08.dcm", "Columns", 4096),  # JPEG-LS near-lossless
    ("MR_small_jp2klossless.dcm", "PhotometricInterpretation", "RGB"),  # J2K: 1 component said to be RGB
    ("SC_rgb_gdcm_KY.dcm", "SamplesPerPixel", 1),  # J2K: 3 components said to be 1
    ("SC_rgb_jpeg_dcmtk.dcm", "BitsAllocated", 32),  # JPEG baseline
    ("SC_rgb_jpeg_gdcm.dcm", "BitsAllocated", 32),  # JPEG lossless (.70)
    ("SC_rgb_jpeg_dcmtk.dcm", "BitsStored", 1),  # JPEG baseline: GDCM asserts BitsAllocated == BitsStored
    ("MR_small_RLE.dcm", "Rows", 4096),
    ("CT_small.dcm", "Rows", 65535),
    ("CT_small.dcm", "BitsAllocated", 32),
    ("rtdose.dcm", "NumberOfFrames", "65535"),
]


@pytest.mark.parametrize("name,keyword,value", HOSTILE, ids=[f"{n}-{k}={v}" for n, k, v in HOSTILE])
def test_hostile_header_does_not_kill_the_process(tmp_path, name, keyword, value):
    ds = pydicom.dcmread(mz.pydicom_data_dir() / "test_files" / name)
    with pydicom.config.disable_value_validation():
        setattr(ds, keyword, value)
    path = tmp_path / f"hostile_{keyword}.dcm"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    path.write_bytes(buf.getvalue())
    out = mz.load_in_subprocess([path], timeout=60)  # raises if the child process died
    if out["ok"]:
        assert out["n_scans"] >= 1
    else:
        assert out["error_type"] == "ScanError", out.get("traceback", out["error"])
        assert not mz.message_problems(out["error"], path.name), out["error"]
    assert out["secs"] < mz.READ_LIMIT_S


# Explicit-VR elements whose VR bytes were damaged (as a byte flip does): pydicom
# converts elements lazily, so the error surfaces wherever the reader first
# touches the element. (0018,0086) EchoNumbers is first read while grouping
# frames, outside any handler: NotImplementedError escaped `load` (fuzz seed 1, case 5744).
BAD_VR = [
    ("0018,0086", "EchoNumbers", b"\x18\x00\x86\x00IS"),
    ("0020,0011", "SeriesNumber", b"\x20\x00\x11\x00IS"),
    ("0010,0010", "PatientName", b"\x10\x00\x10\x00PN"),
    ("0028,0030", "PixelSpacing", b"\x28\x00\x30\x00DS"),
]


@pytest.mark.parametrize("tag,keyword,needle", BAD_VR, ids=[f"{t}-{k}" for t, k, _ in BAD_VR])
def test_damaged_vr_is_a_scan_error_wherever_it_is_read(tmp_path, tag, keyword, needle):
    from engine.io import load
    from engine.scan import ScanError

    data = (mz.pydicom_data_dir() / "test_files" / "MR_small.dcm").read_bytes()
    at = data.find(needle)
    assert at > 0, f"{keyword} not found in MR_small.dcm"
    path = tmp_path / f"bad_vr_{keyword}.dcm"
    path.write_bytes(data[: at + 5] + needle[5:6].lower() + data[at + 6 :])  # 'IS' -> 'Is'
    try:
        result = load([path])
    except ScanError as exc:
        assert not mz.message_problems(str(exc), path.name), str(exc)
    else:
        assert result.scans
