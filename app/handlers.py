"""Handlers of the Scan tab: UI values in, engine calls, UI updates out.

Design decisions
- Handlers are plain functions of plain values (paths, ints, floats and the
  per-user `ScanSession` held in a gr.State); the wiring to components lives
  in `scan_tab`. Multi-output handlers return a dict keyed by output *name*
  so their order is written down once, in `scan_tab`.
- Uploads leave Gradio's cache before they are read (any file there can be
  fetched by URL): each request reads private hard links of its own uploads,
  named as the user named the files, deleted when reading ends, whether it
  worked or not (app.uploads). Only files inside Gradio's upload folder are
  ever deleted there.
- The loaded scans live in a `ScanSession` (app.sessions), released when
  idle or when the tab closes; loads are bounded by engine.memory.
- Errors: a `MedLensError` (the engine's user-facing errors) becomes a gr.Error
  with its message; anything else is logged (exception type and traceback
  only: messages can quote file names) and shown as a generic message. Never
  a stack trace in the browser. Messages are HTML-escaped because Gradio
  renders them as HTML and they can quote user-chosen file names.
- Who may load (issue 16): `load_files` runs under app.access.acting("load"):
  a visitor without login on a shared server is refused (their upload is
  deleted all the same), and each load is one audit line with the content
  hashes of the series read, never their names.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import traceback
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from app import uploads
from app.access import acting, entry
from app.display import view_html
from app.sessions import ScanSession
from engine.errors import MedLensError
from engine.redact import redaction_message
from engine.scan import Scan, ScanError
from engine.views import PLANES, plane_sizes, render_view
from engine.windowing import (
    CUSTOM,
    default_window,
    resolve_window,
    slider_range,
    window_names,
)

log = logging.getLogger("medlens.app")

VIEW_SIZE = 512  # pixels on the long side of each rendered view
MAX_TOASTS = 3  # warnings shown as pop-ups; all of them stay in the warnings panel


# --- errors -----------------------------------------------------------------
GENERIC_ERROR = "Something went wrong while handling this request. The scan was not changed; try again, or upload the files again."


def guarded(fn: Callable | None = None, *, title: str = "Cannot show this scan") -> Callable:
    """Turn engine errors into clear messages; never show a stack trace.

    Use as `@guarded` or `@guarded(title="...")`; `title` heads the message of a MedLensError.
    """
    if fn is None:
        return functools.partial(guarded, title=title)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MedLensError as exc:
            raise gr.Error(html.escape(str(exc), quote=False), title=title, print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 -- last line of defence of a UI event
            log.error(
                "%s in %s (message withheld: it may quote file names)\n%s",
                type(exc).__name__,
                fn.__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            raise gr.Error(GENERIC_ERROR, print_exception=False) from None

    return wrapper


# --- uploads ----------------------------------------------------------------
def upload_folder() -> Path:
    """Gradio's upload cache folder (GRADIO_TEMP_DIR or <tmp>/gradio)."""
    return uploads.upload_folder()


def _uploads(files: Any) -> list[tuple[str, str | None]]:
    """(path, the user's file name if Gradio sent it) of each uploaded file."""
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out = []
    for f in files:
        path = getattr(f, "name", f) if not isinstance(f, (str, os.PathLike)) else f
        out.append((str(path), getattr(f, "orig_name", None)))
    return out


def _discard_refused(arguments: dict[str, Any]) -> None:
    """A refused load still takes its uploads out of Gradio's cache; nothing is read."""
    with uploads.private_copies(_uploads(arguments.get("files"))):
        pass


@guarded
@acting("load", on_denied=_discard_refused)
def load_files(files: list[str] | None) -> dict[str, Any]:
    """Read uploaded files / folder contents / zips; show the first series found."""
    # After a failed upload the widget still lists the (already deleted) files and a new
    # upload is added to that list: read only what is still there.
    with uploads.private_copies(_uploads(files)) as paths:
        if not paths:
            raise gr.Error("Choose one or more files, a .zip or a folder to upload.", print_exception=False)
        from engine.io import load

        result = load(paths)  # checked against engine.memory's bounds before anything is decoded
    skipped = [f"{s.name}: {s.reason}" for s in result.skipped]
    entry().scan(*result.scans).detail.update(series=len(result.scans), skipped=len(skipped))
    session = ScanSession(scans=list(result.scans), skipped=skipped)
    out = show_series(session, 0, toasts=True)
    out["files"] = None  # the uploaded files are gone: clear the upload widget
    return out


# --- showing a series ---------------------------------------------------------
def series_choices(session: ScanSession) -> list[tuple[str, int]]:
    """(label, index) for the series picker; repeated labels get a #n suffix."""
    seen: dict[str, int] = {}
    choices = []
    for i, scan in enumerate(session.scans):
        label = scan.label
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} #{seen[label]}"
        choices.append((label, i))
    return choices


def scan_warnings(scan: Scan, skipped: list[str]) -> list[str]:
    """Messages a reader should see next to the views."""
    out = list(scan.provenance.warnings)
    burned_in = redaction_message(scan)  # removed, checked, or why not (engine.redact)
    if burned_in:
        out.append(burned_in)
    if skipped:
        n = len(skipped)
        out.append(
            f"{n} file{'s' if n > 1 else ''} could not be read and {'were' if n > 1 else 'was'} skipped (see the list under Scan information)."
        )
    return out


def warnings_markdown(messages: list[str]) -> str:
    if not messages:
        return ""
    return "**Warnings**\n\n" + "\n".join(f"- ⚠️ {html.escape(m)}" for m in messages)


def _scan(session: ScanSession | None, series: Any) -> Scan | None:
    if session is None or not session.scans:
        return None
    try:
        index = int(series)
    except (TypeError, ValueError):
        index = 0
    if not 0 <= index < len(session.scans):
        raise ScanError(f"series {index} does not exist: this upload has {len(session.scans)} (pick one from the list)")
    return session.scans[index]


def _snap(value: float, step: float) -> float:
    return float(round(round(value / step) * step, 6))


def show_series(session: ScanSession, series: int, toasts: bool = False) -> dict[str, Any]:
    """Every output of the tab for series `series` of `session`, at its default view."""
    scan = _scan(session, series)
    assert scan is not None
    center, width, preset = default_window(scan)
    lo, hi, step = slider_range(scan)
    center, width = _snap(min(max(center, lo), hi), step), _snap(min(max(width, step), hi - lo), step)
    sizes = plane_sizes(scan)
    messages = scan_warnings(scan, session.skipped)
    if toasts:
        for message in messages[:MAX_TOASTS]:
            gr.Warning(html.escape(message))
    out: dict[str, Any] = {
        "state": session,
        "series": gr.update(choices=series_choices(session), value=int(series), interactive=len(session.scans) > 1),
        "volume": gr.update(minimum=0, maximum=max(scan.n_volumes - 1, 1), value=0, step=1, visible=scan.n_volumes > 1),
        "preset": gr.update(choices=window_names(scan.modality) + [CUSTOM], value=preset),
        "center": gr.update(minimum=lo, maximum=hi, step=step, value=center),
        "width": gr.update(minimum=step, maximum=hi - lo, step=step, value=width),
        "metadata": {"series": scan.summary(), "skipped_files": list(session.skipped)},
        "warnings": warnings_markdown(messages),
        "mip_row": gr.update(visible=not scan.is_2d),
    }
    if scan.is_2d:
        out["axial_slider"] = gr.update(visible=False, minimum=0, maximum=1, value=0)
        out["axial_view"] = gr.update(value=_view_html(scan, "image", 0, center, width, None, 0), visible=True)
        for plane in ("coronal", "sagittal"):  # one view of a 2D image takes the whole row
            out[f"{plane}_slider"] = gr.update(visible=False, minimum=0, maximum=1, value=0)
            out[f"{plane}_view"] = gr.update(value="", visible=False)
            out[f"{plane}_column"] = gr.update(visible=False)
        return out
    for plane in PLANES:
        n, middle = sizes[plane]
        out[f"{plane}_slider"] = gr.update(minimum=0, maximum=max(n - 1, 1), step=1, value=middle, visible=True, interactive=n > 1)
        out[f"{plane}_view"] = gr.update(value=_view_html(scan, plane, middle, center, width, None, 0), visible=True)
        out[f"{plane}_column"] = gr.update(visible=True)
    return out


@guarded
def select_series(session: ScanSession | None, series: int) -> dict[str, Any]:
    """The user picked another series from the list."""
    if session is None or not session.scans:
        raise gr.Error("Upload a scan first.", print_exception=False)
    return show_series(session, series)


# --- rendering ------------------------------------------------------------------
def _view_html(scan: Scan, plane: str, index: int, center: float, width: float, mip_mm: float | None, volume: int) -> str:
    if scan.is_2d:
        return view_html(render_view(scan, "image", 0, center, width, size=VIEW_SIZE * 2), "Image")
    n = plane_sizes(scan)[plane][0]
    index = min(max(int(index), 0), n - 1)
    image = render_view(scan, plane, index, center, width, mip_mm=mip_mm, volume=int(volume), size=VIEW_SIZE)
    caption = f"slice {index + 1}/{n}"
    if mip_mm:
        caption += f" · MIP {mip_mm:g} mm"
    if scan.n_volumes > 1:
        caption += f" · volume {int(volume) + 1}/{scan.n_volumes}"
    return view_html(image, plane.capitalize(), caption)


def _placeholder(plane: str) -> str:
    return view_html(None, plane.capitalize(), "no scan loaded: upload files, a .zip or a folder")


def _views(session, series, volume, indices, center, width, mip, mip_mm) -> tuple[str, str, str]:
    scan = _scan(session, series)
    if scan is None:
        return tuple(_placeholder(p) for p in PLANES)  # type: ignore[return-value]
    slab = float(mip_mm) if mip and mip_mm else None
    if scan.is_2d:
        return (_view_html(scan, "image", 0, center, width, None, 0), "", "")
    return tuple(  # type: ignore[return-value]
        _view_html(scan, plane, index, center, width, slab, volume) for plane, index in zip(PLANES, indices)
    )


@guarded
def render_views(session, series, volume, axial, coronal, sagittal, center, width, mip, mip_mm) -> tuple[str, str, str]:
    """All three views (volume, window or MIP changed)."""
    return _views(session, series, volume, (axial, coronal, sagittal), center, width, mip, mip_mm)


def render_plane(plane: str) -> Callable:
    """A handler re-rendering one plane (its slice slider moved)."""

    @guarded
    def render(session, series, volume, index, center, width, mip, mip_mm) -> str:
        scan = _scan(session, series)
        if scan is None:
            return _placeholder(plane)
        if scan.is_2d:
            return _view_html(scan, "image", 0, center, width, None, 0) if plane == "axial" else ""
        slab = float(mip_mm) if mip and mip_mm else None
        return _view_html(scan, plane, index, center, width, slab, volume)

    render.__name__ = f"render_{plane}"
    return render


@guarded
def set_preset(session, series, preset, volume, axial, coronal, sagittal, mip, mip_mm) -> tuple:
    """A window preset was picked: move the centre/width sliders and re-render."""
    scan = _scan(session, series)
    if scan is None:
        return (gr.update(), gr.update(), *(_placeholder(p) for p in PLANES))
    if preset == CUSTOM or not preset:
        return (gr.update(), gr.update(), gr.update(), gr.update(), gr.update())
    center, width = resolve_window(scan, preset)
    lo, hi, step = slider_range(scan)
    center, width = _snap(min(max(center, lo), hi), step), _snap(min(max(width, step), hi - lo), step)
    views = _views(session, series, volume, (axial, coronal, sagittal), center, width, mip, mip_mm)
    return (center, width, *views)


@guarded
def set_window(session, series, volume, axial, coronal, sagittal, center, width, mip, mip_mm) -> tuple:
    """Free centre/width moved: the preset becomes "Custom"."""
    views = _views(session, series, volume, (axial, coronal, sagittal), center, width, mip, mip_mm)
    return (CUSTOM, *views)
