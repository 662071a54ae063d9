"""Loading scans from whatever the user drops in.

`load(paths)` gathers files (folders and zips expanded safely), sniffs each
one's format from its first bytes (names only as a hint), hands DICOM files
to the series reader as one batch (so a series split over many files is
assembled) and everything else to its own reader. A bad file is reported in
`LoadResult.skipped` and never spoils the rest; `ScanError` is raised only
when nothing at all could be loaded.

Every scan leaves `load` through engine.redact: burned-in text is blanked
here, right after reading, so no viewer, model, library row or CLI output
ever gets the unredacted pixels (MEDLENS_REDACT, engine.redact).

A `dicomweb:STUDY/SERIES` (or `dicomweb:STUDY`) path is a PACS series: it is
retrieved over DICOMweb by engine.pacs and read by the same DICOM reader,
in memory; a PACS failure is reported like a bad file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from engine.io.dicom import looks_like_dicom, read_dicom
from engine.io.image2d import looks_like_image, read_image
from engine.io.nifti import looks_like_nifti, read_nifti
from engine.io.sources import DEFAULT_LIMITS, Limits, Skipped, Source, gather_sources
from engine.memory import LoadGuard, MemoryBudget
from engine.redact import redact_scan
from engine.pacs.locator import is_locator
from engine.scan import Scan, ScanError

__all__ = ["load", "load_one", "load_sources", "classify", "LoadResult", "Skipped", "Limits", "Source", "ScanError"]


@dataclass
class LoadResult:
    scans: list[Scan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def messages(self) -> list[str]:
        return [f"{s.name}: {s.reason}" for s in self.skipped]


def classify(source: Source) -> str:
    """What a source holds, from its first bytes (its name only as a hint).

    One of "dicom", "nifti", "image", "empty", "bad-dicom" (named like DICOM,
    no DICOM header) or "unknown". Raises ScanError when it cannot be read.
    """
    try:
        head = source.head(352)
    except ScanError:
        raise
    except Exception as exc:
        raise ScanError(f"cannot read file ({exc})") from None
    name = source.name
    if not head:
        return "empty"
    if looks_like_nifti(head, name) and not (len(head) >= 132 and head[128:132] == b"DICM"):
        return "nifti"
    if looks_like_dicom(head, name):
        return "dicom"
    if looks_like_image(head, name):
        return "image"
    if name.lower().endswith((".dcm", ".dicom", ".ima")):
        return "bad-dicom"
    return "unknown"


def _summarise_failure(skipped: list[Skipped], n_sources: int) -> str:
    if not skipped:
        return "no files found: the upload or folder is empty"
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    common = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
    detail = "; ".join(f"{reason} ({n} file{'s' if n > 1 else ''})" for reason, n in common)
    if len(skipped) == 1:
        return f"{skipped[0].name}: {skipped[0].reason}"
    return f"no scan could be loaded from {len(skipped)} files: {detail}"


def load(
    paths: Iterable[str | os.PathLike] | str | os.PathLike, limits: Limits = DEFAULT_LIMITS, *, budget: MemoryBudget | None = None
) -> LoadResult:
    """Every scan (series, volume or image) found under `paths`.

    Each scan is checked against the memory bounds before it is decoded
    (engine.memory: MEDLENS_MAX_SERIES_VOXELS, and `budget`, by default this
    process's ledger); one over a bound is skipped with a message naming it.
    """
    guard = LoadGuard(budget)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ScanError("nothing to load: give at least one file, folder or zip")
    scans: list[Scan] = []
    skipped: list[Skipped] = []
    remote = [str(p) for p in paths if is_locator(p)]
    if remote:
        from engine.pacs.retrieve import load_locators

        scans, skipped = load_locators(remote)
        paths = [p for p in paths if not is_locator(p)]
    sources, local_skipped = gather_sources(paths, limits)
    return load_sources(sources, skipped + local_skipped, guard=guard, scans=scans)


def load_sources(
    sources: list[Source], skipped: list[Skipped] | None = None, *, guard: LoadGuard | None = None, scans: list[Scan] | None = None
) -> LoadResult:
    """Every scan in `sources` (DICOM files read together as series), plus `scans` read elsewhere (a PACS);
    `skipped` holds earlier problems. Every scan is redacted before it is returned.

    The batch runner feeds this with sources it has read into memory already;
    `load` feeds it with what gather_sources found under the user's paths.
    """
    guard = guard or LoadGuard()
    scans = list(scans or [])
    skipped = list(skipped or [])
    dicom: list[Source] = []
    for source in sources:
        try:
            kind = classify(source)
            if kind == "dicom":
                dicom.append(source)
            elif kind == "nifti":
                scans.append(read_nifti(source, guard=guard))
            elif kind == "image":
                scans.append(read_image(source, guard=guard))
            elif kind == "empty":
                skipped.append(Skipped(source.name, "empty file"))
            elif kind == "bad-dicom":
                skipped.append(
                    Skipped(source.name, "named like DICOM but has no DICOM header (no 'DICM' marker, no DICOM tags at the start)")
                )
            else:
                skipped.append(Skipped(source.name, "not a DICOM, NIfTI or image file; skipped"))
        except ScanError as exc:
            msg = str(exc)
            prefix = source.name + ": "
            skipped.append(Skipped(source.name, msg[len(prefix) :] if msg.startswith(prefix) else msg))
        except MemoryError:
            skipped.append(Skipped(source.name, "file too large to load into memory"))
        except Exception as exc:  # last line of defence: one bad file never stops the batch
            skipped.append(Skipped(source.name, f"could not be read ({type(exc).__name__}: {str(exc)[:160]})"))
    if dicom:
        dicom_scans, dicom_skipped = read_dicom(dicom, guard)
        scans.extend(dicom_scans)
        skipped.extend(dicom_skipped)
    if not scans:
        raise ScanError(_summarise_failure(skipped, len(sources)))
    for scan in scans:
        redact_scan(scan)  # before anything else sees the pixels
    scans.sort(key=_scan_sort_key)
    return LoadResult(scans, skipped)


def _scan_sort_key(scan: Scan):
    number = scan.metadata.get("SeriesNumber")
    try:
        number = int(number)
    except (TypeError, ValueError):
        number = 1 << 30
    return (number, -scan.voxels.size, scan.label)


def load_one(
    paths, series: int | None = None, limits: Limits = DEFAULT_LIMITS, *, budget: MemoryBudget | None = None
) -> tuple[Scan, LoadResult]:
    """The single scan under `paths`; with several, `series` (0-based) picks one."""
    result = load(paths, limits, budget=budget)
    if series is None:
        if len(result.scans) > 1:
            listing = "; ".join(f"[{i}] {s.label}" for i, s in enumerate(result.scans))
            raise ScanError(f"{len(result.scans)} series found, choose one with --series N: {listing}")
        return result.scans[0], result
    if not 0 <= series < len(result.scans):
        raise ScanError(f"series {series} does not exist: {len(result.scans)} found (0-{len(result.scans) - 1})")
    return result.scans[series], result
