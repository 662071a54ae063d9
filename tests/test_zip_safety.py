"""Hostile zips are refused or skipped with a clear message, in bounded time and memory.

Every archive is built here, in the test: path traversal and absolute member
names, a symlink member, a 1 GiB zip bomb (1 MiB on disk), the same gigabyte
split into members small enough to pass a per-member ratio check, a member
whose header lies about its size, 10,000 and 10,001 entries, nested archives
and junk. Loads that could blow up run in a fresh Python process
(tests/_mutate.load_in_subprocess) so their wall time and peak RSS are the
loader's alone.

Bomb members are written as raw deflate: one 1 MiB block of zeros compressed
with a full flush is byte-aligned and self-contained, so repeating it N times
is a valid stream of N MiB of zeros. Building the 1 GiB bomb costs a CRC pass
(~0.5 s) instead of compressing a gigabyte (~5 s).
"""

from __future__ import annotations

import stat
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

import _mutate as mz

MAX_SECS = 30.0
MAX_RSS_MB = 1024.0
MIB = 1 << 20


# --------------------------------------------------------------------------
# Building archives
# --------------------------------------------------------------------------


def _zeros_deflate(n_mib: int) -> tuple[bytes, int]:
    """Raw deflate stream of n_mib MiB of zeros, and its CRC-32."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(bytes(MIB)) + co.flush(zlib.Z_FULL_FLUSH)
    stream = block * n_mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc = 0
    zero = bytes(MIB)
    for _ in range(n_mib):
        crc = zlib.crc32(zero, crc)
    return stream, crc


def write_raw_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip from (name, deflated bytes, crc, real size, declared size) tuples; declared may lie."""
    out = bytearray()
    central = bytearray()
    for name, data, crc, _real, declared in members:
        raw_name = name.encode()
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(data), declared, len(raw_name), 0)
        out += raw_name + data
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, len(data), declared, len(raw_name), 0, 0, 0, 0, 0o100644 << 16, offset
        )
        central += raw_name
    cd_offset = len(out)
    out += central
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), cd_offset, 0)
    path.write_bytes(bytes(out))
    return path


def _series_members(n: int = 4, prefix: str = "series/") -> list[tuple[str, bytes]]:
    return [(prefix + name, data) for name, data in mz.write_series(None, n)]


def _write_zip(path: Path, members: list[tuple[str, bytes]], symlinks: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name)  # ZipInfo keeps '..' and leading '/' as given
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            zf.writestr(info, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


JUNK = [
    ("notes.txt", b"patient list, do not share\n" * 10),
    ("junk.dcm", b"\x00" * 200 + b"not really dicom" * 20),
    ("random.bin", bytes(range(256)) * 8),
    ("fake.nii", b"\x5c\x01\x00\x00" + b"\xff" * 400),
    ("empty.dcm", b""),
]

TRAVERSAL = [
    "../evil.dcm",
    "../../evil_up2.dcm",
    "/abs/evil_abs.dcm",
    "ok/../../evil_mid.dcm",
    "..\\evil_backslash.dcm",
    "C:/evil_drive.dcm",
]


def _skipped_names(result) -> dict[str, str]:
    return {s.name: s.reason for s in result.skipped}


def _reason_for(skipped: dict[str, str], member: str) -> str:
    hits = [reason for name, reason in skipped.items() if name.endswith(member) or member in name]
    assert hits, f"{member!r} is not listed in skipped: {sorted(skipped)}"
    return hits[0]


def _evil_files(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        found += [p for p in root.rglob("evil*") if p.is_file()]
    return found


# --------------------------------------------------------------------------
# Path traversal, symlinks
# --------------------------------------------------------------------------


def test_traversal_members_are_skipped_and_nothing_is_written(tmp_path):
    from engine.io import load

    good = _series_members(4)
    evil_bytes = good[0][1]  # a perfectly valid DICOM file behind a hostile name
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    zpath = _write_zip(work / "upload.zip", good + [(n, evil_bytes) for n in TRAVERSAL], symlinks=("series/link.dcm",))
    assert {i.filename for i in zipfile.ZipFile(zpath).infolist()} >= set(TRAVERSAL), "zipfile rewrote the hostile names"

    result = load([zpath])
    assert len(result.scans) == 1
    assert result.scans[0].voxels.shape[0] == 4, "the good series must load whole"
    skipped = _skipped_names(result)
    for name in TRAVERSAL:
        reason = _reason_for(skipped, name)
        assert "path" in reason.lower() or "unsafe" in reason.lower(), reason
    assert "link" in _reason_for(skipped, "series/link.dcm").lower()
    assert not _evil_files(tmp_path), "a member escaped the archive onto disk"


def test_zip_of_only_traversal_members_is_refused_with_the_reason(tmp_path):
    from engine.io import load
    from engine.scan import ScanError

    data = _series_members(1)[0][1]
    zpath = _write_zip(tmp_path / "only_evil.zip", [("../evil.dcm", data)])
    with pytest.raises(ScanError) as err:
        load([zpath])
    message = str(err.value)
    assert "evil.dcm" in message and ("path" in message.lower() or "unsafe" in message.lower()), message
    assert not _evil_files(tmp_path)


# --------------------------------------------------------------------------
# Bombs
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    one_gib, crc_gib = _zeros_deflate(1024)
    fifteen, crc15 = _zeros_deflate(15)
    good = _series_members(4)
    series_zip = folder / "series.zip"
    _write_zip(series_zip, good)
    out = {
        # 1 GiB of zeros in one member (compression ratio ~1000:1)
        "bomb": write_raw_zip(folder / "bomb.zip", [("bomb.dcm", one_gib, crc_gib, 1 << 30, 1 << 30)]),
        # the same gigabyte as 68 members of 15 MiB each: every member is under a 16 MiB ratio floor
        "split": write_raw_zip(folder / "split.zip", [(f"slice{i:03d}.dcm", fifteen, crc15, 15 * MIB, 15 * MIB) for i in range(68)]),
        # a member that says it holds 1 MiB and inflates to 1 GiB
        "liar": write_raw_zip(folder / "liar.zip", [("liar.dcm", one_gib, crc_gib, 1 << 30, MIB)]),
        "series": series_zip,
    }
    # the bomb next to a good series: the series loads, the bomb is skipped
    with zipfile.ZipFile(series_zip) as src:
        members = [(i.filename, src.read(i)) for i in src.infolist()]
    mixed = folder / "mixed.zip"
    raw = [(name, _deflate(data), zlib.crc32(data), len(data), len(data)) for name, data in members]
    write_raw_zip(mixed, raw + [("bomb.dcm", one_gib, crc_gib, 1 << 30, 1 << 30)])
    out["mixed"] = mixed
    return out


def _deflate(data: bytes) -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    return co.compress(data) + co.flush()


def _load_bounded(paths) -> dict:
    # interpreter start and imports come on top of the load itself
    return mz.load_in_subprocess(paths, timeout=MAX_SECS + 15)


def _bounded(out: dict, what: str) -> None:
    # a hang is caught by the subprocess timeout; speed is measured in bench/viewer_speed.py, not asserted here
    assert out["maxrss_mb"] < MAX_RSS_MB, f"{what}: peak RSS {out['maxrss_mb']:.0f} MB"


def test_bomb_fixture_is_what_it_claims(bombs):
    info = zipfile.ZipFile(bombs["bomb"]).infolist()[0]
    assert info.file_size == 1 << 30 and info.compress_size < 2 * MIB
    with zipfile.ZipFile(bombs["split"]) as zf:  # spot-check that the stream is valid deflate
        assert zf.open(zf.infolist()[0]).read(3 * MIB) == bytes(3 * MIB)


def test_one_gib_bomb_is_refused_quickly_and_lightly(bombs):
    out = _load_bounded([bombs["bomb"]])
    print(f"bomb: {out['secs']:.2f} s, peak RSS {out['maxrss_mb']:.0f} MB: {out.get('error')}")
    assert not out["ok"] and out["error_type"] == "ScanError", out
    assert "bomb.dcm" in out["error"]
    assert any(w in out["error"].lower() for w in ("bomb", "ratio", "limit", "too large")), out["error"]
    _bounded(out, "1 GiB bomb")


def test_bomb_next_to_a_good_series(bombs):
    out = _load_bounded([bombs["mixed"]])
    print(f"mixed: {out['secs']:.2f} s, peak RSS {out['maxrss_mb']:.0f} MB, skipped {out.get('skipped')}")
    assert out["ok"], out
    assert out["n_scans"] == 1 and out["shapes"][0][0] == 4
    reasons = {name: reason for name, reason in out["skipped"]}
    assert any(name.endswith("bomb.dcm") for name in reasons), reasons
    _bounded(out, "bomb + series")


def test_gigabyte_split_under_the_ratio_floor(bombs):
    out = _load_bounded([bombs["split"]])
    print(f"split: {out['secs']:.2f} s, peak RSS {out['maxrss_mb']:.0f} MB: {out.get('error', '')[:300]}")
    assert not out["ok"] and out["error_type"] == "ScanError", out
    assert len(out["error"]) > 20
    _bounded(out, "68 x 15 MiB of zeros")


def test_zero_filled_dcm_file_is_refused_quickly(tmp_path):
    """The root cause of the split bomb, without a zip: zeros named .dcm, parsed element by element."""
    path = tmp_path / "zeros.dcm"
    with open(path, "wb") as fh:
        for _ in range(64):
            fh.write(bytes(MIB))
    out = _load_bounded([path])
    print(f"64 MiB of zeros: {out['secs']:.2f} s, peak RSS {out['maxrss_mb']:.0f} MB: {out.get('error')}")
    assert not out["ok"] and out["error_type"] == "ScanError", out
    assert out["secs"] < 5.0, f"64 MiB of zeros took {out['secs']:.1f} s to refuse"


def test_member_lying_about_its_size(bombs):
    out = _load_bounded([bombs["liar"]])
    print(f"liar: {out['secs']:.2f} s, peak RSS {out['maxrss_mb']:.0f} MB: {out.get('error')}")
    assert not out["ok"] and out["error_type"] == "ScanError", out
    assert "liar.dcm" in out["error"]
    _bounded(out, "lying member")


# --------------------------------------------------------------------------
# Entry counts
# --------------------------------------------------------------------------


def _many_entries_zip(path: Path, n_junk: int, with_series: bool) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        if with_series:
            for name, data in _series_members(4):
                zf.writestr(name, data)
        for i in range(n_junk):
            suffix = ".dcm" if i % 2 else ".txt"
            zf.writestr(f"junk/{i:05d}{suffix}", b"junk %d\n" % i)
    return path


def test_10001_entries_refused_as_a_whole(tmp_path):
    zpath = _many_entries_zip(tmp_path / "many.zip", 10_001, with_series=False)
    out = _load_bounded([zpath])
    print(f"10,001 entries: {out['secs']:.2f} s: {out.get('error')}")
    assert not out["ok"] and out["error_type"] == "ScanError", out
    assert "10,000" in out["error"] or "10000" in out["error"], out["error"]
    assert "many.zip" in out["error"]
    _bounded(out, "10,001 entries")


def test_exactly_10000_entries_with_a_series_inside(tmp_path):
    zpath = _many_entries_zip(tmp_path / "full.zip", 10_000 - 4, with_series=True)
    assert len(zipfile.ZipFile(zpath).infolist()) == 10_000
    out = _load_bounded([zpath])
    print(f"10,000 entries: {out['secs']:.2f} s, peak RSS {out['maxrss_mb']:.0f} MB")
    assert out["ok"], out
    assert out["n_scans"] == 1 and out["shapes"][0][0] == 4
    assert len(out["skipped"]) == 10_000 - 4
    assert all(reason.strip() for _, reason in out["skipped"])
    _bounded(out, "10,000 entries")


def test_exactly_10000_junk_entries(tmp_path):
    zpath = _many_entries_zip(tmp_path / "junk.zip", 10_000, with_series=False)
    out = _load_bounded([zpath])
    print(f"10,000 junk: {out['secs']:.2f} s: {out.get('error')}")
    assert not out["ok"] and out["error_type"] == "ScanError", out
    assert not mz.message_problems(out["error"]), out["error"]
    assert len(out["error"]) < 2000, "the refusal must summarise, not list 10,000 files"
    _bounded(out, "10,000 junk entries")


# --------------------------------------------------------------------------
# Nested archives, junk, and everything at once
# --------------------------------------------------------------------------


def test_nested_zip_is_skipped_not_opened(tmp_path):
    from engine.io import load
    from engine.scan import ScanError

    inner = _write_zip(tmp_path / "inner.zip", _series_members(3))
    outer = _write_zip(tmp_path / "outer.zip", [("inner.zip", inner.read_bytes()), ("deeper/also.zip", inner.read_bytes())])
    with pytest.raises(ScanError) as err:
        load([outer])
    message = str(err.value)
    assert "nested" in message.lower() or "archive" in message.lower(), message


def test_zip_disguised_as_dicom_inside_a_zip(tmp_path):
    from engine.io import load
    from engine.scan import ScanError

    inner = _write_zip(tmp_path / "inner.zip", _series_members(3))
    outer = _write_zip(tmp_path / "outer.zip", [("image.dcm", inner.read_bytes())])
    with pytest.raises(ScanError) as err:
        load([outer])
    assert "image.dcm" in str(err.value)
    assert not mz.message_problems(str(err.value)), str(err.value)


def test_junk_only_zip_is_refused_with_a_summary(tmp_path):
    from engine.io import load
    from engine.scan import ScanError

    zpath = _write_zip(tmp_path / "junk.zip", JUNK)
    with pytest.raises(ScanError) as err:
        load([zpath])
    assert not mz.message_problems(str(err.value)), str(err.value)


def hostile_zip(folder: Path) -> Path:
    """One upload with everything wrong in it except one 5-slice series (also timed by bench/viewer_speed.py)."""
    good = _series_members(5, prefix="CT/")
    inner = _write_zip(folder / "inner.zip", _series_members(2))
    members = good + JUNK + [("../evil.dcm", good[0][1]), ("nested/inner.zip", inner.read_bytes())]
    raw = [(name, _deflate(data), zlib.crc32(data), len(data), len(data)) for name, data in members]
    one_gib, crc = _zeros_deflate(1024)
    return write_raw_zip(folder / "everything.zip", raw + [("bomb.dcm", one_gib, crc, 1 << 30, 1 << 30)])


def test_good_series_survives_junk_traversal_nested_and_bomb(tmp_path, bombs):
    """The acceptance case: one upload with everything wrong in it except one series (its speed: bench/viewer_speed.py)."""
    from engine.io import load

    zpath = hostile_zip(tmp_path)
    result = load([zpath])
    assert len(result.scans) == 1 and result.scans[0].voxels.shape[0] == 5
    skipped = _skipped_names(result)
    print("\n".join(f"{n}: {r}" for n, r in sorted(skipped.items())))
    for member in ["../evil.dcm", "nested/inner.zip", "bomb.dcm", "notes.txt", "junk.dcm", "random.bin", "fake.nii", "empty.dcm"]:
        reason = _reason_for(skipped, member)
        assert len(reason.strip()) >= 8 and len(reason.split()) >= 2, f"{member}: vague reason {reason!r}"
    assert not _evil_files(tmp_path)
    out = _load_bounded([zpath])
    _bounded(out, "everything.zip")
