"""Series loading: MedLens `load([folder])` against SimpleITK's ImageSeriesReader.

    python bench/load_series.py                  # build the series once, time 5 interleaved repeats
    python bench/load_series.py --repeats 9 --profile

The series is made from a real CT volume (../shared/data/volumes/
totalsegmentator/example_ct.nii.gz, 3 mm): resampled (trilinear) onto a
512 x 512 x 300 grid at 0.75 x 0.75 x 1.0 mm around the volume's centre and
written with pydicom as 300 uncompressed CT files (Explicit VR Little
Endian, 12-bit unsigned, RescaleIntercept -1024, axial
ImageOrientationPatient, ImagePositionPatient per slice) under bench/work/
(git-ignored). File names are shuffled, so both readers must sort by
geometry.

Timing: one untimed warm-up of each reader (imports, page cache), then
`--repeats` rounds, alternating which reader goes first. The SimpleITK side
includes GetGDCMSeriesFileNames (its series discovery) and asks for float32
output, the engine's voxel type, so both produce float32 Hounsfield units.
Before timing, both results are checked against the written values after
reorienting SimpleITK's LPS image to closest-canonical RAS+ (the engine's
convention): the comparison is only fair if both give the same volume.

Writes bench/results/load_series.md (date, CPU and its vector extensions,
versions, numbers, and a cProfile breakdown of one engine load).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCE = SHARED / "volumes" / "totalsegmentator" / "example_ct.nii.gz"
WORK = REPO / "bench" / "work" / "series_300"
ROWS = COLS = 512
N_SLICES = 300
PIXEL_MM = 0.75
SLICE_MM = 1.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------


def cpu_info() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = [
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
    ]
    have = [f for f in wanted if f in flags]
    return model, (", ".join(have) if have else "none of " + ", ".join(wanted))


# --------------------------------------------------------------------------
# Building the series
# --------------------------------------------------------------------------


def target_lps_affine(src_affine: np.ndarray, src_shape) -> np.ndarray:
    """Voxel (col, row, slice) -> LPS mm for an axial grid centred on the source volume."""
    centre_ras = src_affine @ np.r_[(np.asarray(src_shape[:3]) - 1) / 2.0, 1.0]
    centre_lps = centre_ras[:3] * [-1, -1, 1]
    half = np.array([(COLS - 1) * PIXEL_MM, (ROWS - 1) * PIXEL_MM, (N_SLICES - 1) * SLICE_MM]) / 2
    aff = np.diag([PIXEL_MM, PIXEL_MM, SLICE_MM, 1.0])
    aff[:3, 3] = centre_lps - half
    return aff


def resample(src_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (col, row, slice) on the target grid, and its LPS affine."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(str(src_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    tgt = target_lps_affine(img.affine, data.shape)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    # output index -> source index
    m = np.linalg.inv(img.affine) @ lps_to_ras @ tgt
    out = ndimage.affine_transform(
        data, m[:3, :3], offset=m[:3, 3], output_shape=(COLS, ROWS, N_SLICES), order=1, mode="constant", cval=-1024.0, prefilter=False
    )
    return np.clip(np.rint(out), -1024, 3071).astype(np.int16), tgt


def ct_slice(k: int, uids: tuple[str, str, str], position: list[float], stored: np.ndarray):
    """Slice k of an axial 12-bit CT series (Explicit VR Little Endian, RescaleIntercept -1024); also bench/pacs.py's."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "Bench^Phantom", "BENCH0001"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240101", 1, k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined, ds.PatientPosition, ds.KVP = "ABDOMEN", "HFS", 120
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = position
    ds.SliceLocation = position[2]
    ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.SliceThickness = SLICE_MM
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = stored.tobytes()
    return ds


def build_series(folder: Path, src_path: Path) -> np.ndarray:
    """Write the 300-file series; return the HU volume (col, row, slice) that was written."""
    from pydicom.uid import generate_uid

    hu, tgt = resample(src_path)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.dcm"):
        old.unlink()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(N_SLICES):
        position = [float(v) for v in (tgt @ [0, 0, k, 1])[:3]]
        stored = (hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16)  # (row, col)
        ds = ct_slice(k, (study, series, frame), position, stored)
        # shuffled names: neither readdir order nor names tell the slice order
        name = hashlib.sha1(f"{series}-{k}".encode()).hexdigest()[:16] + ".dcm"
        ds.save_as(folder / name, enforce_file_format=True)
    np.save(folder.parent / "series_300_hu.npy", hu)
    return hu


# --------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------


def load_engine(folder: Path):
    from engine.io import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load([folder])
    assert len(result.scans) == 1, f"engine found {len(result.scans)} series"
    return result.scans[0]


def load_sitk(folder: Path):
    import SimpleITK as sitk

    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return reader.Execute()


def sitk_as_ras_canonical(img) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (x, y, z) array and affine in closest-canonical RAS+."""
    import nibabel as nib
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(img)  # (z, y, x) in ITK index order
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    canon = nib.as_closest_canonical(nib.Nifti1Image(np.ascontiguousarray(arr.T), ras))
    return np.asarray(canon.dataobj), canon.affine


def written_as_ras_canonical(hu: np.ndarray, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    src = nib.load(str(SOURCE))
    tgt = target_lps_affine(src.affine, src.shape)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ tgt
    canon = nib.as_closest_canonical(nib.Nifti1Image(hu.astype(np.float32), ras))
    return np.asarray(canon.dataobj), canon.affine


def verify(folder: Path, hu: np.ndarray) -> list[str]:
    """Both readers give the written volume, in the same orientation."""
    truth, truth_aff = written_as_ras_canonical(hu, folder)
    scan = load_engine(folder)
    eng = scan.voxels.T  # (x, y, z)
    s_arr, s_aff = sitk_as_ras_canonical(load_sitk(folder))
    lines = []
    for label, arr, aff in (("engine", eng, scan.affine), ("SimpleITK", s_arr, s_aff)):
        if arr.shape != truth.shape:
            raise SystemExit(f"{label}: shape {arr.shape} != written {truth.shape}")
        diff = float(np.abs(arr.astype(np.float64) - truth).max())
        adiff = float(np.abs(aff - truth_aff).max())
        lines.append(
            f"{label}: shape {arr.shape} (x, y, z in RAS+), max |voxel - written| = {diff:g} HU, max |affine - written| = {adiff:.2g} mm"
        )
        if diff > 0 or adiff > 1e-3:
            raise SystemExit(f"{label} disagrees with the written series: " + lines[-1])
    return lines


# --------------------------------------------------------------------------
# Timing and profile
# --------------------------------------------------------------------------


def time_both(folder: Path, repeats: int) -> dict[str, list[float]]:
    runners = {"engine": lambda: load_engine(folder), "SimpleITK": lambda: load_sitk(folder)}
    for fn in runners.values():  # warm-up: imports, page cache
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(repeats):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for name in order:
            t0 = time.perf_counter()
            result = runners[name]()
            times[name].append(time.perf_counter() - t0)
            del result
    return times


def profile_engine(folder: Path, top: int = 15) -> tuple[str, str]:
    """cProfile of one engine load: (top functions by own time, engine functions by cumulative time)."""
    prof = cProfile.Profile()
    prof.enable()
    load_engine(folder)
    prof.disable()

    def table(sort: str, *restrict) -> str:
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats(sort).print_stats(*restrict)
        text = out.getvalue()
        start = text.find("   ncalls")  # drop pstats' preamble
        body = text[start:].rstrip() if start >= 0 else text
        return body.replace(str(REPO) + "/", "").replace(str(Path(np.__file__).parents[1]) + "/", "")

    return table("tottime", top), table("cumulative", r"engine/", top)


def engine_stage_times(folder: Path) -> list[str]:
    """Coarse split of one engine load: reading+decoding files vs the rest."""
    import pydicom

    files = sorted(folder.glob("*.dcm"))
    t0 = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        _ = ds.pixel_array
    t_pydicom = time.perf_counter() - t0
    t0 = time.perf_counter()
    scan = load_engine(folder)
    t_engine = time.perf_counter() - t0
    t0 = time.perf_counter()
    from engine.scan import hash_voxels

    hash_voxels(scan.voxels, scan.affine)
    t_hash = time.perf_counter() - t0
    return [
        f"plain pydicom `dcmread` + `pixel_array` of the 300 files: {t_pydicom:.2f} s",
        f"engine `load([folder])` end to end: {t_engine:.2f} s",
        f"content hash of the float32 volume alone (`hash_voxels`): {t_hash:.2f} s",
    ]


_RSS_SNIPPET = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import bench_load_series_mod as b

def vm(key):  # VmRSS / VmHWM in MB (ru_maxrss would include the parent's peak, see tests/_mutate.py)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

base = vm("VmRSS:")
t0 = time.perf_counter()
(b.load_engine if sys.argv[2] == "engine" else b.load_sitk)(Path(sys.argv[3]))
print(time.perf_counter() - t0, base, vm("VmHWM:"))
"""


def peak_rss(folder: Path) -> dict[str, tuple[float, float, float]]:
    """(cold-process seconds, RSS after imports MB, peak RSS MB) of one load in a fresh process per reader."""
    import subprocess
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # import this file under a module name the child can use
        (Path(tmp) / "bench_load_series_mod.py").write_text(Path(__file__).read_text())
        for name in ("engine", "SimpleITK"):
            # imports happen before the baseline reading so that only the load is counted
            pre = "import SimpleITK" if name == "SimpleITK" else "import engine.io"
            code = pre + "\n" + _RSS_SNIPPET
            proc = subprocess.run(
                [sys.executable, "-c", code, tmp, name, str(folder)],
                capture_output=True,
                text=True,
                cwd=str(REPO),
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            if proc.returncode != 0:
                raise SystemExit(f"peak-RSS run of {name} failed:\n{proc.stderr[-2000:]}")
            secs, base, peak = (float(x) for x in proc.stdout.split()[-3:])
            out[name] = (secs, base, peak)
    return out


def main(argv=None) -> int:
    # imported here, not at the top: the peak-RSS child imports this file from a folder without bench/ on its path
    from _report import bullets, header, package_versions, section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="write the series again even if present")
    parser.add_argument("--profile", action="store_true", help="always include the cProfile table (default: only when slower)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_series.md")
    args = parser.parse_args(argv)

    if not SOURCE.is_file():
        print(f"source volume {SOURCE} is absent: this benchmark needs ../shared/data", file=sys.stderr)
        return 2
    hu_path = WORK.parent / "series_300_hu.npy"
    if args.rebuild or not hu_path.is_file() or len(list(WORK.glob("*.dcm"))) != N_SLICES:
        print(f"building {N_SLICES} slices from {SOURCE.name} into {WORK} ...", file=sys.stderr)
        t0 = time.perf_counter()
        hu = build_series(WORK, SOURCE)
        print(f"  built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    else:
        hu = np.load(hu_path)
    size_mb = sum(f.stat().st_size for f in WORK.glob("*.dcm")) / 1e6

    print("checking both readers against the written volume ...", file=sys.stderr)
    checks = verify(WORK, hu)
    for line in checks:
        print("  " + line, file=sys.stderr)

    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    load_before = os.getloadavg()[0]
    print(f"timing {args.repeats} interleaved repeats ...", file=sys.stderr)
    times = time_both(WORK, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["engine"] / med["SimpleITK"]
    verdict = "engine is no slower than SimpleITK" if ratio <= 1.0 else f"engine is {ratio:.2f}x slower than SimpleITK (target: no slower)"
    for k, v in times.items():
        print(f"  {k:10s} median {med[k]:.3f} s  min {min(v):.3f} s  runs {', '.join(f'{x:.3f}' for x in v)}", file=sys.stderr)
    print("  " + verdict, file=sys.stderr)

    load_after = os.getloadavg()[0]
    rss = peak_rss(WORK)
    for k, (secs, base, peak) in rss.items():
        print(f"  {k:10s} fresh process: {secs:.2f} s, RSS after imports {base:.0f} MB, peak {peak:.0f} MB", file=sys.stderr)
    stages = engine_stage_times(WORK)
    prof = profile_engine(WORK) if (args.profile or ratio > 1.0) else None

    model, flags = cpu_info()
    lines = [
        *header(
            "Series loading: engine vs SimpleITK",
            f"python bench/load_series.py --repeats {args.repeats}" + (" --profile" if args.profile else ""),
            f"{model}, {len(os.sched_getaffinity(0))} usable cores; vector extensions: {flags}",
            package_versions("pydicom", "SimpleITK", "numpy", "nibabel", "scipy"),
        ),
        f"- SimpleITK threads: {threads}; the engine reads files in one Python thread",
        f"- Series: {N_SLICES} files, {ROWS}x{COLS}, 0.75 x 0.75 x 1.0 mm, uncompressed 16-bit (12 stored), "
        f"Explicit VR Little Endian, {size_mb:.0f} MB, resampled from `{SOURCE.name}` (real CT), shuffled file names; "
        "page cache warm",
        f"- Machine load (1-min load average) before / after timing: {load_before:.2f} / {load_after:.2f}"
        + (
            " (near or above the core count: other processes competed for the CPU, compare minima)"
            if max(load_before, load_after) > 0.75 * len(os.sched_getaffinity(0))
            else ""
        ),
        "",
        "## Result",
        "",
        "| reader | median s | min s | runs (s) |",
        "|---|---:|---:|---|",
    ]
    for k, v in times.items():
        lines.append(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} |")
    lines += [
        "",
        f"**{verdict}** (median ratio engine / SimpleITK = {ratio:.2f}).",
        "",
        f"Memory, one load in a fresh process per reader (the float32 volume itself is {ROWS * COLS * N_SLICES * 4 / 2**20:.0f} MiB):",
        "",
        "| reader | time, cold process s | RSS after imports MB | peak RSS MB |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {v[0]:.2f} | {v[1]:.0f} | {v[2]:.0f} |" for k, v in rss.items()]
    lines += [
        "",
        "What each side does: engine = `engine.io.load([folder])` (gather files, sniff, read every file with "
        "pydicom, decode, rescale to HU, sort by position along the slice normal, check spacing/orientation, "
        "de-identify, reorient to RAS+, float32; the content hash is listed separately below). SimpleITK = `GetGDCMSeriesFileNames` "
        "(GDCM scans and sorts the folder) + `ImageSeriesReader.Execute()` with float32 output (rescale "
        "applied), LPS orientation.",
    ]
    lines += bullets("## Same volume from both", checks)
    lines += bullets("## Where the engine's time goes", stages)
    if prof:
        lines += section("cProfile of one engine load, top functions by own time:", "```", prof[0], "```")
        lines += section("The same load, engine functions by cumulative time:", "```", prof[1], "```")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
