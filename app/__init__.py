"""MedLens Gradio UI: `build_demo(engine) -> gr.Blocks`.

Design decisions
- This package holds UI only; every computation is an engine call made by a
  thin handler (app.handlers). `import app` imports this package; the
  repository's app.py script builds the demo and launches it.
- Privacy settings live here, next to the UI, so the script, the tests and
  any deployment launch the same way: `LAUNCH_OPTIONS` (no run history, a
  file-size cap, no stack traces) and `delete_cache` on the Blocks as a
  backstop to the handlers, which delete each upload as soon as it is read.
"""

from __future__ import annotations

import os

# Before gradio is imported anywhere through this package.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from app.display import CSS  # noqa: E402
from app.library_tab import build_library_tab  # noqa: E402
from app.pacs_panel import build_pacs_tab  # noqa: E402
from app.scan_tab import build_scan_tab  # noqa: E402

__all__ = ["build_demo", "LAUNCH_OPTIONS", "DELETE_CACHE"]

TITLE = "MedLens"
# (frequency, age) in seconds: sweep Gradio's cache of this app every 10 min
# for files older than 10 min (uploads are normally deleted within seconds).
DELETE_CACHE = (600, 600)
LAUNCH_OPTIONS = dict(
    max_file_size="2gb",
    run_history=False,  # else runs are kept in the browser and can be pushed to a HF bucket
    show_error=False,  # gr.Error messages still show; other exceptions never leak details
    footer_links=["api", "settings"],
)


def build_demo(engine=None, model: str | None = None, ask_model: str | None = None) -> gr.Blocks:
    """The MedLens UI. `engine` is reserved for the model engine (later); None is fine.

    model: model source for zero-shot labels (shipped name, hf-hub:, local-dir:),
    e.g. from MEDLENS_MODEL; None offers the shipped default when installed.
    ask_model: question-answering (Q-Former) model source, e.g. from MEDLENS_ASK_MODEL.
    The app starts and the viewer works without any model.
    """
    del engine
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            "# MedLens\nDrop a scan (DICOM files, a folder or .zip of a series, NIfTI, PNG/JPEG/TIFF). "
            "Uploads are read, then deleted from the server; nothing identifying is kept."
        )
        with gr.Tabs() as tabs:  # explicit, so opening a library hit can select the Scan tab
            with gr.Tab("Scan", id="scan"):
                scan = build_scan_tab(model=model, ask_model=ask_model)
            build_library_tab(scan, tabs, model=model)
            build_pacs_tab(scan, tabs, model=model)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_kwargs(**overrides) -> dict:
    """Launch options with the privacy settings, plus theme/CSS (Gradio 6 takes them at launch)."""
    return {**LAUNCH_OPTIONS, "css": CSS, **overrides}
