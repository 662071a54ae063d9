"""Helpers shared by the robustness tests and `bench/fuzz_readers.py`.

Design decisions
- Every mutated input is a pure function of (seed file, case index, base
  seed): a failure is reproduced by its case number alone, without storing
  the mutated bytes.
- Reads run in a separate worker process. A native decoder (OpenJPEG, CharLS,
  GDCM) that crashes or hangs on a mutated file must be recorded as a
  finding, not take the test session down; the worker is restarted after the
  crashing case and the run goes on.
- The worker caps its address space (RLIMIT_AS), so a loader that trusts a
  corrupted header and tries to allocate tens of GiB fails with a recorded
  MemoryError instead of pushing the machine into swap.
- Test data come only from installed packages (pydicom, nibabel) and, when
  present, ../shared/data. Nothing is downloaded; pydicom's
  `get_testdata_file` is never called because it may fetch external files.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDLENS_SHARED_DATA", REPO.parent / "shared" / "data"))


def pydicom_data_dir() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data"


def nibabel_data_dir() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


def deid_data_dir() -> Path | None:
    try:
        import deid_data
    except ImportError:
        return None
    return Path(deid_data.__file__).parent / "data"


# --------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------

# pydicom test files chosen to cover every pixel pipeline the readers have.
DICOM_SEEDS = {
    "test_files/CT_small.dcm": "uncompressed CT, explicit VR little endian, rescale",
    "test_files/MR_small_implicit.dcm": "uncompressed MR, implicit VR",
    "test_files/MR_small_bigendian.dcm": "explicit VR big endian",
    "test_files/MR_small_jp2klossless.dcm": "JPEG 2000 lossless",
    "test_files/JPEG2000.dcm": "JPEG 2000 lossy, NM",
    "test_files/MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "test_files/MR_small_RLE.dcm": "RLE lossless",
    "test_files/SC_rgb_jpeg_dcmtk.dcm": "JPEG baseline, YBR_FULL colour",
    "test_files/JPGExtended.dcm": "JPEG extended (12-bit)",
    "test_files/SC_rgb_jpeg_gdcm.dcm": "JPEG lossless SV1 (.70)",
    "test_files/rtdose.dcm": "multi-frame (15 frames), implicit VR",
    "test_files/SC_rgb_rle_2frame.dcm": "multi-frame RGB, RLE",
    "test_files/dicomdirtests/77654033/CR1/6154": "MONOCHROME1 CR",
    "test_files/examples_palette.dcm": "PALETTE COLOR ultrasound",
    "test_files/image_dfl.dcm": "deflated explicit VR little endian",
}

NIFTI_SEEDS = {
    "anatomical.nii": "NIfTI-1 3D, uint8",
    "functional.nii": "NIfTI-1 4D",
    "example4d.nii.gz": "NIfTI-1 4D, gzip",
    "example_nifti2.nii.gz": "NIfTI-2, gzip",
    "standard.nii.gz": "NIfTI-1 tiny, gzip",
}


@dataclass
class Seed:
    name: str  # stable short name used in reports
    path: str
    fmt: str  # "dicom" | "nifti"
    note: str


def default_seeds(include_shared: bool = True) -> list[Seed]:
    """The fuzzing seeds present on this machine (package data + shared data)."""
    seeds: list[Seed] = []
    base = pydicom_data_dir()
    for rel, note in DICOM_SEEDS.items():
        p = base / rel
        if p.is_file():
            seeds.append(Seed("pydicom:" + rel.split("/", 1)[1], str(p), "dicom", note))
    nib_dir = nibabel_data_dir()
    for rel, note in NIFTI_SEEDS.items():
        p = nib_dir / rel
        if p.is_file():
            seeds.append(Seed("nibabel:" + rel, str(p), "nifti", note))
    if include_shared and SHARED_DATA.is_dir():
        series = SHARED_DATA / "volumes" / "totalsegmentator" / "ct_dicom_series"
        if series.is_dir():
            slices = sorted(p for p in series.iterdir() if p.is_file())
            if slices:
                seeds.append(Seed("shared:ct_dicom_series[0]", str(slices[0]), "dicom", "real CT slice, JPEG 2000 lossless 512x512"))
        nii = SHARED_DATA / "volumes" / "totalsegmentator" / "example_ct_sm.nii.gz"
        if nii.is_file():
            seeds.append(Seed("shared:example_ct_sm.nii.gz", str(nii), "nifti", "real CT volume, gzip"))
    return seeds


def seed_suffix(seed: Seed) -> str:
    name = Path(seed.path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    return ".dcm"


# --------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------

MUTATION_KINDS = {
    "dicom": ("truncate", "flip", "delete_tag", "corrupt_value"),
    "nifti": ("truncate", "flip", "corrupt_header"),
}

_INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)


def _header_span(data: bytes, fmt: str) -> int:
    """Bytes at the start that hold the header (where flips hurt most)."""
    if fmt == "nifti":
        return min(len(data), 544)
    # DICOM: preamble + meta + main header; pixel data usually starts later.
    idx = data.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010) little endian
    if idx < 0:
        idx = data.find(b"\x7f\xe0\x00\x10")  # big endian
    return max(min(len(data), idx + 16 if idx > 0 else 2048), 1)


def truncate(data: bytes, rng: random.Random, fmt: str) -> tuple[bytes, str]:
    n = len(data)
    if n < 2:
        return b"", "truncate@0"
    if rng.random() < 0.5:
        cut = rng.randrange(0, min(n, _header_span(data, fmt) + 64))
    else:
        cut = rng.randrange(0, n)
    return data[:cut], f"truncate@{cut}/{n}"


def flip(data: bytes, rng: random.Random, fmt: str) -> tuple[bytes, str]:
    buf = bytearray(data)
    if not buf:
        return data, "flip nothing"
    span = _header_span(data, fmt)
    k = rng.randint(1, 20)
    where = []
    for _ in range(k):
        pos = rng.randrange(0, span) if rng.random() < 0.75 else rng.randrange(0, len(buf))
        r = rng.random()
        if r < 0.4:
            buf[pos] ^= 1 << rng.randrange(8)
        elif r < 0.7:
            buf[pos] = rng.choice(_INTERESTING_BYTES)
        else:
            buf[pos] = rng.randrange(256)
        where.append(pos)
    return bytes(buf), f"flip {k} bytes at {sorted(where)[:6]}{'...' if k > 6 else ''}"


def _dcm_bytes(ds) -> bytes:
    import pydicom

    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=False)
    return out.getvalue()


# Elements whose deletion hits the readers' assumptions (chosen half the time).
_CRITICAL_TAGS = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelData",
    "NumberOfFrames",
    "PlanarConfiguration",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SeriesInstanceUID",
    "SOPClassUID",
    "Modality",
    "RedPaletteColorLookupTableData",
    "RedPaletteColorLookupTableDescriptor",
    "WindowCenter",
    "WindowWidth",
    "SliceThickness",
    "FrameIncrementPointer",
    "GridFrameOffsetVector",
    "DoseGridScaling",
    "TransferSyntaxUID",
)


def delete_tag(data: bytes, rng: random.Random, fmt: str) -> tuple[bytes, str]:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    present = [kw for kw in _CRITICAL_TAGS if kw in ds or (kw == "TransferSyntaxUID" and kw in ds.file_meta)]
    if present and rng.random() < 0.5:
        kw = rng.choice(present)
        if kw == "TransferSyntaxUID":
            del ds.file_meta[kw]
        else:
            delattr(ds, kw)
        label = kw
    else:
        tags = list(ds.keys())
        tag = rng.choice(tags)
        label = f"{tag} {ds[tag].keyword or 'private'}"
        del ds[tag]
    return _dcm_bytes(ds), f"delete {label}"


_VALUE_CORRUPTIONS = {
    "Rows": (0, 1, 65535, 4096),
    "Columns": (0, 1, 65535, 4096),
    "BitsAllocated": (0, 1, 7, 12, 24, 32, 64),
    "BitsStored": (0, 1, 17, 33, 64),
    "HighBit": (0, 31, 63),
    "PixelRepresentation": (1, 2, 65535),
    "SamplesPerPixel": (0, 2, 3, 4, 65535),
    "NumberOfFrames": ("0", "-1", "65535", "2147483647", "abc"),
    "PhotometricInterpretation": ("MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", "XYZ", ""),
    "PlanarConfiguration": (1, 2),
    "RescaleSlope": ("0", "-1", "1e308", "nan", "inf", "abc"),
    "RescaleIntercept": ("1e308", "-1e308", "nan", "abc"),
    "PixelSpacing": (["0", "0"], ["-1", "1"], ["nan", "1"], ["1e308", "1e308"], ["abc"]),
    "SliceThickness": ("0", "-5", "nan"),
    "ImagePositionPatient": (["nan", "0", "0"], ["1e308", "0", "0"], ["0"]),
    "ImageOrientationPatient": (["0", "0", "0", "0", "0", "0"], ["1", "0", "0", "1", "0", "0"], ["nan"] * 6, ["1", "0"]),
    "WindowWidth": ("0", "-1", "nan"),
    "WindowCenter": ("nan", "1e308"),
    "Modality": ("", "XX", "SM"),
}


def corrupt_value(data: bytes, rng: random.Random, fmt: str) -> tuple[bytes, str]:
    """Set one technical element to a hostile value and re-save (DICOM's header corruption)."""
    import pydicom
    from pydicom.dataelem import DataElement, RawDataElement
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.tag import Tag

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    kw = rng.choice(sorted(_VALUE_CORRUPTIONS))
    value = rng.choice(_VALUE_CORRUPTIONS[kw])
    tag = Tag(tag_for_keyword(kw))
    vr = dictionary_VR(tag)
    if vr in ("US", "SS", "UL"):
        ds[tag] = DataElement(tag, vr, int(value) if not isinstance(value, str) else 0)
    else:
        # Text VRs: put the raw bytes in so values pydicom would refuse to encode reach the file.
        text = "\\".join(value) if isinstance(value, list) else str(value)
        raw = text.encode("ascii")
        if len(raw) % 2:
            raw += b" "
        implicit, little = ds.original_encoding
        ds._dict[tag] = RawDataElement(
            tag, None if implicit else vr, len(raw), raw, 0, bool(implicit), bool(little) if little is not None else True
        )
    try:
        out = _dcm_bytes(ds)
    except Exception:  # the value cannot even be encoded: fall back to a byte flip
        return flip(data, rng, fmt)
    return out, f"set {kw}={value!r}"


# NIfTI-1 / NIfTI-2 header fields: (offset, struct code) for each version.
_NIFTI1 = {
    "sizeof_hdr": (0, "i"),
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "quatern": (256, "3f"),
    "srow": (280, "12f"),
    "magic": (344, "4s"),
}
_NIFTI2 = {
    "sizeof_hdr": (0, "i"),
    "magic": (4, "8s"),
    "datatype": (12, "h"),
    "bitpix": (14, "h"),
    "dim": (16, "8q"),
    "pixdim": (104, "8d"),
    "vox_offset": (168, "q"),
    "scl_slope": (176, "d"),
    "scl_inter": (184, "d"),
    "qform_code": (344, "i"),
    "sform_code": (348, "i"),
    "quatern": (352, "3d"),
    "srow": (400, "12d"),
}
_DTYPES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 7, 9999, -1)
_BAD_FLOATS = (0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30)


def corrupt_header(data: bytes, rng: random.Random, fmt: str) -> tuple[bytes, str]:
    buf = bytearray(data)
    if len(buf) < 348:
        return truncate(data, rng, fmt)
    (size_le,) = struct.unpack_from("<i", buf, 0)
    endian = "<" if size_le in (348, 540) else ">"
    (size,) = struct.unpack_from(endian + "i", buf, 0)
    table = _NIFTI2 if size == 540 else _NIFTI1
    field = rng.choice(
        [
            "dim",
            "dim",
            "dim",
            "datatype",
            "datatype",
            "bitpix",
            "vox_offset",
            "vox_offset",
            "pixdim",
            "scl_slope",
            "scl_inter",
            "qform_code",
            "sform_code",
            "quatern",
            "srow",
            "magic",
            "sizeof_hdr",
        ]
    )
    off, code = table[field]
    fmt_code = endian + code
    values = list(struct.unpack_from(fmt_code, buf, off))
    if field == "dim":
        i = rng.randrange(0, 8)
        big = 2**31 - 1 if code[-1] == "q" else 32767
        values[i] = rng.choice((0, -1, 1, 7, 8, 255, 32767, big, -32768))
        label = f"dim[{i}]={values[i]}"
    elif field == "datatype":
        values[0] = rng.choice(_DTYPES)
        label = f"datatype={values[0]}"
    elif field == "bitpix":
        values[0] = rng.choice((0, 1, 7, 64, 128, -8))
        label = f"bitpix={values[0]}"
    elif field == "vox_offset":
        choices = (0, 1, 347, 349, len(buf) - 1, len(buf) + 1000, 2**30, -352)
        v = rng.choice(choices)
        values[0] = float(v) if code[-1] == "f" else int(v)
        label = f"vox_offset={v}"
    elif field == "sizeof_hdr":
        values[0] = rng.choice((0, 347, 349, 540, 348, -1))
        label = f"sizeof_hdr={values[0]}"
    elif field == "magic":
        values[0] = rng.choice((b"ni1\x00", b"n+1\x00", b"n+2\x00\r\n\x1a\n", b"\x00\x00\x00\x00", b"XXXX"))
        label = f"magic={values[0]!r}"
    elif field in ("qform_code", "sform_code"):
        values[0] = rng.choice((0, 1, 2, 5, 99, -1))
        label = f"{field}={values[0]}"
    else:  # float fields
        i = rng.randrange(0, len(values))
        values[i] = rng.choice(_BAD_FLOATS)
        label = f"{field}[{i}]={values[i]}"
    struct.pack_into(fmt_code, buf, off, *values)
    return bytes(buf), label


_MUTATORS = {
    "truncate": truncate,
    "flip": flip,
    "delete_tag": delete_tag,
    "corrupt_value": corrupt_value,
    "corrupt_header": corrupt_header,
}


@dataclass
class Case:
    index: int
    seed: str
    kind: str
    detail: str
    suffix: str
    data: bytes


_seed_bytes_cache: dict[str, bytes] = {}


def _seed_bytes(path: str) -> bytes:
    if path not in _seed_bytes_cache:
        _seed_bytes_cache[path] = Path(path).read_bytes()
    return _seed_bytes_cache[path]


def make_case(seeds: list[Seed], index: int, base_seed: int) -> Case:
    """Case `index` of a run: seeds round-robin, mutation kind and parameters from the RNG."""
    seed = seeds[index % len(seeds)]
    rng = random.Random(base_seed * 1_000_003 + index)
    kinds = MUTATION_KINDS[seed.fmt]
    kind = kinds[(index // len(seeds)) % len(kinds)]
    raw = _seed_bytes(seed.path)
    suffix = seed_suffix(seed)
    gz = suffix == ".nii.gz"
    # For gzip NIfTI, mutate the payload and recompress most of the time (flips of
    # the compressed stream mostly test zlib's CRC check, not our reader).
    on_payload = gz and (kind == "corrupt_header" or rng.random() < 0.7)
    data = gzip.decompress(raw) if on_payload else raw
    try:
        mutated, detail = _MUTATORS[kind](data, rng, seed.fmt)
    except Exception as exc:  # the mutator could not parse the seed (should not happen for valid seeds)
        mutated, detail = flip(data, rng, seed.fmt)
        detail = f"{kind} failed ({type(exc).__name__}); {detail}"
    if on_payload:
        mutated = gzip.compress(mutated, compresslevel=1, mtime=0)
        detail += " (in gzip payload)"
    return Case(index, seed.name, kind, detail, suffix, mutated)


# --------------------------------------------------------------------------
# Messages and swallowed exceptions
# --------------------------------------------------------------------------


def message_problems(message: str, file_name: str | None = None) -> list[str]:
    """Why a ScanError message would not let a person act on it (empty list: fine)."""
    import re

    problems = []
    text = (message or "").strip()
    if len(text) < 15:
        problems.append(f"message too short: {text!r}")
    if len(re.findall(r"[A-Za-z]{2,}", text)) < 3:
        problems.append(f"message has fewer than 3 words: {text!r}")
    if re.match(r"^\w*(Error|Exception|Warning)\b", text) or re.fullmatch(r"[^:]*: ?<[\w.]+ object at 0x\w+>", text):
        problems.append(f"message is a bare exception repr: {text!r}")
    if "Traceback (most recent call last)" in text:
        problems.append("message holds a traceback")
    if file_name and file_name not in text:
        problems.append(f"message does not name the file {file_name!r}: {text!r}")
    return problems


@dataclass
class Swallowed:
    """An exception that a catch-all turned into a ScanError/Skipped message."""

    type: str
    message: str
    origin: str  # file:line in function, of the frame that raised it
    internal: bool  # raised by engine/ code itself (or by numpy called from it): a bug, not bad input
    traceback: str


def _origin(exc: BaseException) -> tuple[str, bool]:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?", False
    frame = frames[-1]
    for fr in reversed(frames):  # numpy raising means the caller passed something wrong
        frame = fr
        if f"{os.sep}numpy{os.sep}" not in fr.filename:
            break
    path = Path(frame.filename).resolve()
    engine_dir = (REPO / "engine").resolve()
    internal = engine_dir in path.parents
    where = path.relative_to(REPO) if REPO in path.parents else path.name
    return f"{where}:{frame.lineno} in {frame.name}", internal


class CatchAllProbe:
    """Record exceptions that the loaders' last-line-of-defence handlers swallow.

    The loaders rightly catch every exception from third-party decoders and
    turn it into a message. The same handlers also hide bugs in our own code
    (a TypeError in geometry becomes "series could not be assembled (...)").
    This probe wraps the readers and the engine's `_short(exc)` helper to see
    each swallowed exception with its traceback; it changes no behaviour.
    """

    _MODULES = ("engine.io.dicom", "engine.io.dicom_assembly", "engine.io.nifti", "engine.io.image2d", "engine.io.geometry")
    _READERS = ("read_dicom", "read_nifti", "read_image")

    def __init__(self) -> None:
        self.swallowed: list[Swallowed] = []
        self._undo: list[tuple[object, str, object]] = []

    def _record(self, exc: BaseException) -> None:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "ScanError":
            return
        origin, internal = _origin(exc)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
        self.swallowed.append(Swallowed(type(exc).__name__, str(exc)[:300], origin, internal, tb))

    def __enter__(self) -> "CatchAllProbe":
        import importlib

        from engine.scan import ScanError

        for modname in self._MODULES:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            orig = getattr(mod, "_short", None)
            if callable(orig):

                def short(exc, *a, __orig=orig, **k):
                    self._record(exc)
                    return __orig(exc, *a, **k)

                self._undo.append((mod, "_short", orig))
                mod._short = short
        eio = importlib.import_module("engine.io")
        for name in self._READERS:
            orig = getattr(eio, name, None)
            if callable(orig):

                def reader(*a, __orig=orig, **k):
                    try:
                        return __orig(*a, **k)
                    except ScanError:
                        raise
                    except BaseException as exc:
                        self._record(exc)
                        raise

                self._undo.append((eio, name, orig))
                setattr(eio, name, reader)
        return self

    def __exit__(self, *exc_info) -> None:
        for obj, name, orig in reversed(self._undo):
            setattr(obj, name, orig)
        self._undo.clear()

    @property
    def internal(self) -> list[Swallowed]:
        # the same exception can pass through two handlers; report it once
        seen, out = set(), []
        for s in self.swallowed:
            key = (s.type, s.message, s.origin)
            if s.internal and key not in seen:
                seen.add(key)
                out.append(s)
        return out


# --------------------------------------------------------------------------
# Running loads in a worker process
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    seed: str
    kind: str
    detail: str
    status: str  # "scan" | "scan_error" | "exception" | "crash" | "hang"
    secs: float
    message: str = ""
    traceback: str = ""
    n_scans: int = 0
    message_problems: list | None = None  # why the ScanError message is not actionable
    internal: list | None = None  # exceptions raised by engine code and swallowed by a catch-all
    n_swallowed: int = 0  # library exceptions turned into messages (expected for corrupt input)

    @property
    def slow(self) -> bool:
        return self.secs > READ_LIMIT_S

    @property
    def problems(self) -> list[str]:
        """Everything that makes this case a failure (empty: it passed)."""
        out = []
        if self.status in ("exception", "crash", "hang"):
            out.append(f"{self.status}: {self.message}")
        if self.slow:
            out.append(f"read took {self.secs:.1f} s (limit {READ_LIMIT_S:g} s)")
        for p in self.message_problems or []:
            out.append(p)
        for s in self.internal or []:
            out.append(f"internal {s['type']} at {s['origin']} swallowed: {s['message']}")
        return out

    @property
    def failed(self) -> bool:
        return bool(self.problems)


READ_LIMIT_S = 5.0
_CASE_MARK = "=== medlens-fuzz case "


def _vm_hwm_kb() -> int:
    """Peak RSS of this process image (VmHWM); see load_in_subprocess for why not ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _limit_memory(gib: float) -> None:
    import resource

    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker(args) -> int:
    """Load each case and append one JSON line per event to args.results."""
    sys.path.insert(0, str(REPO))
    if args.mem_gib > 0:
        _limit_memory(args.mem_gib)
    import warnings

    warnings.simplefilter("ignore")
    import engine.io
    from engine.scan import ScanError

    seeds = [Seed(**s) for s in json.loads(Path(args.seeds).read_text())]
    work = Path(args.tmp)
    with open(args.results, "a", buffering=1) as out, CatchAllProbe() as probe:
        for i in range(args.start, args.stop):
            case = make_case(seeds, i, args.seed)
            path = work / f"case{i}{case.suffix}"
            path.write_bytes(case.data)
            out.write(json.dumps({"event": "start", "index": i, "seed": case.seed, "kind": case.kind, "detail": case.detail}) + "\n")
            probe.swallowed.clear()
            sys.stderr.write(f"\n{_CASE_MARK}{i}\n")  # the parent keeps only the crashing case's stderr
            sys.stderr.flush()
            t0 = time.perf_counter()
            status, message, tb, n = "scan", "", "", 0
            try:
                result = engine.io.load([str(path)])
                n = len(result.scans)
                if n == 0:
                    status, message = "exception", "load returned no scans and raised nothing"
            except ScanError as exc:
                status, message = "scan_error", str(exc)
            except BaseException as exc:  # noqa: BLE001 - this is what we are looking for
                status, message = "exception", f"{type(exc).__name__}: {exc}"[:500]
                tb = traceback.format_exc()[-4000:]
            secs = time.perf_counter() - t0
            path.unlink(missing_ok=True)
            result = None
            problems = message_problems(message, path.name) if status == "scan_error" else []
            internal = [asdict(s) for s in probe.internal]
            out.write(
                json.dumps(
                    {
                        "event": "done",
                        "index": i,
                        "status": status,
                        "secs": secs,
                        "message": message[:500],
                        "traceback": tb,
                        "n_scans": n,
                        "message_problems": problems,
                        "internal": internal,
                        "n_swallowed": len(probe.swallowed),
                    }
                )
                + "\n"
            )

        out.write(json.dumps({"event": "end", "maxrss_kb": _vm_hwm_kb()}) + "\n")
    return 0


def run_fuzz(
    seeds: list[Seed], n: int, base_seed: int, *, hang_s: float = 60.0, mem_gib: float = 8.0, progress=None
) -> tuple[list[Outcome], dict]:
    """Run cases 0..n-1 in worker processes; restart after a crash or hang."""
    outcomes: dict[int, Outcome] = {}
    info = {"worker_restarts": 0, "max_worker_rss_kb": 0}
    with tempfile.TemporaryDirectory(prefix="medlens-fuzz-") as tmp:
        tmpdir = Path(tmp)
        seeds_file = tmpdir / "seeds.json"
        seeds_file.write_text(json.dumps([asdict(s) for s in seeds]))
        work = tmpdir / "cases"
        work.mkdir()
        start = 0
        while start < n:
            results = tmpdir / f"results{start}.jsonl"
            results.touch()
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "worker",
                "--seeds",
                str(seeds_file),
                "--start",
                str(start),
                "--stop",
                str(n),
                "--seed",
                str(base_seed),
                "--tmp",
                str(work),
                "--results",
                str(results),
                "--mem-gib",
                str(mem_gib),
            ]
            err_path = tmpdir / f"stderr{start}.txt"
            err_fh = open(err_path, "wb")  # a file, not a pipe: a chatty decoder must not block the worker
            proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=err_fh)
            current: dict | None = None
            killed = False
            started_at = time.monotonic()
            pos = 0
            ended = False
            stderr_tail = b""
            while True:
                with open(results) as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                # only consume complete lines
                complete = chunk[: chunk.rfind("\n") + 1] if "\n" in chunk else ""
                pos += len(complete.encode())
                for line in complete.splitlines():
                    ev = json.loads(line)
                    if ev["event"] == "start":
                        current, started_at = ev, time.monotonic()
                    elif ev["event"] == "done":
                        assert current is not None and current["index"] == ev["index"]
                        outcomes[ev["index"]] = Outcome(
                            ev["index"],
                            current["seed"],
                            current["kind"],
                            current["detail"],
                            ev["status"],
                            ev["secs"],
                            ev["message"],
                            ev["traceback"],
                            ev["n_scans"],
                            ev["message_problems"],
                            ev["internal"],
                            ev["n_swallowed"],
                        )
                        if progress:
                            progress(outcomes[ev["index"]])
                        current = None
                    elif ev["event"] == "end":
                        info["max_worker_rss_kb"] = max(info["max_worker_rss_kb"], ev["maxrss_kb"])
                        ended = True
                rc = proc.poll()
                if rc is not None and not complete:
                    break
                if current is not None and time.monotonic() - started_at > hang_s:
                    proc.kill()
                    proc.wait()
                    killed = True
                    break
                if not complete:
                    time.sleep(0.02)
            err_fh.close()
            err_text = err_path.read_bytes().decode(errors="replace")
            stderr_tail = err_text[err_text.rfind(_CASE_MARK) :][-3000:].encode()
            if ended and current is None:
                break
            # The worker died or hung: the case it had started is the culprit.
            info["worker_restarts"] += 1
            if current is None:
                raise RuntimeError(f"fuzz worker exited (rc={proc.returncode}) between cases:\n{stderr_tail.decode(errors='replace')}")
            i = current["index"]
            hung = killed
            status = "hang" if hung else "crash"
            outcomes[i] = Outcome(
                i,
                current["seed"],
                current["kind"],
                current["detail"],
                status,
                time.monotonic() - started_at,
                f"worker {'killed after ' + str(hang_s) + ' s' if hung else 'died, rc=' + str(proc.returncode)}",
                stderr_tail.decode(errors="replace"),
            )
            if progress:
                progress(outcomes[i])
            start = i + 1
    return [outcomes[i] for i in sorted(outcomes)], info


def reproduce(index: int, base_seed: int, out_dir: str | os.PathLike, include_shared: bool = True) -> Path:
    """Write mutated case `index` to out_dir (to hand a failing input to a developer)."""
    case = make_case(default_seeds(include_shared), index, base_seed)
    path = Path(out_dir) / f"fuzz_case{index}_seed{base_seed}{case.suffix}"
    path.write_bytes(case.data)
    return path


# --------------------------------------------------------------------------
# One load in a fresh process, with its time and peak memory
# --------------------------------------------------------------------------

_LOAD_SNIPPET = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
from engine.io import load
from engine.scan import ScanError
t0 = time.perf_counter()
out = {}
try:
    r = load(sys.argv[2:])
    out = {"ok": True, "n_scans": len(r.scans), "shapes": [list(s.voxels.shape) for s in r.scans],
           "skipped": [[s.name, s.reason] for s in r.skipped]}
except ScanError as exc:
    out = {"ok": False, "error": str(exc), "error_type": "ScanError"}
except BaseException as exc:
    import traceback
    out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__,
           "traceback": traceback.format_exc()[-3000:]}
out["secs"] = time.perf_counter() - t0
def _hwm():
    # VmHWM: peak RSS of this process image. ru_maxrss is not used: across the
    # parent's vfork + exec Linux carries the parent's high-water mark into it.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["maxrss_mb"] = _hwm()
print("MEDLENS-RESULT " + json.dumps(out))
"""


def load_in_subprocess(paths: list[str | os.PathLike], timeout: float = 120.0) -> dict:
    """Run engine.io.load(paths) in a fresh Python; return outcome, seconds and peak RSS (MB).

    The child reports its own peak RSS from /proc/self/status (VmHWM). Neither
    RUSAGE_CHILDREN here (the maximum over every earlier child of the session)
    nor the child's ru_maxrss (Linux carries the parent's high-water mark
    across vfork + exec, so a 1 GB pytest process would make every child look
    1 GB big) measures the load alone.
    `wall_secs` includes interpreter start and imports.
    """
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_SNIPPET, str(REPO), *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(REPO),
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"load({[Path(p).name for p in paths]}) did not finish within {timeout:g} s; the process was killed") from None
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("MEDLENS-RESULT "):
            out = json.loads(line[len("MEDLENS-RESULT ") :])
            out["wall_secs"] = wall
            return out
    raise AssertionError(f"load subprocess died (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


# --------------------------------------------------------------------------
# A small, valid DICOM series built from a real slice
# --------------------------------------------------------------------------


def write_series(folder: Path | None, n: int = 4, template: str | None = None) -> list[tuple[str, bytes]]:
    """`n` CT slices (1 mm apart) made from pydicom's CT_small; written to folder if given.

    Returns (file name, bytes) pairs so callers can also put them in zips.
    """
    import pydicom
    from pydicom.uid import generate_uid

    template = template or str(pydicom_data_dir() / "test_files" / "CT_small.dcm")
    base = pydicom.dcmread(template)
    series_uid, study_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    out = []
    x0, y0, z0 = (float(v) for v in base.ImagePositionPatient)
    for k in range(n):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.FrameOfReferenceUID = for_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [x0, y0, z0 + k]
        ds.SliceThickness = 1
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        name = f"slice{k:03d}.dcm"
        out.append((name, buf.getvalue()))
        if folder is not None:
            (folder / name).write_bytes(buf.getvalue())
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--seeds", required=True)
    w.add_argument("--start", type=int, required=True)
    w.add_argument("--stop", type=int, required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--tmp", required=True)
    w.add_argument("--results", required=True)
    w.add_argument("--mem-gib", type=float, default=8.0)
    r = sub.add_parser("reproduce", help="write mutated case INDEX to a folder")
    r.add_argument("index", type=int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default=".")
    a = parser.parse_args()
    if a.cmd == "worker":
        sys.exit(_worker(a))
    print(reproduce(a.index, a.seed, a.out))
