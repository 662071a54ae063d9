"""MedLens Gradio UI: `build_demo(engine) -> gr.Blocks`.

Design decisions
- This package holds UI only; every computation is an engine call made by a
  thin handler (app.handlers). `import app` imports this package; the
  repository's app.py script builds the demo and launches it.
- Privacy settings live here, next to the UI, so the script, the tests and
  any deployment launch the same way: `launch_kwargs()` (no run history, a
  file-size cap, no stack traces; MedLens's own upload folder, the upload
  middleware that gives each upload a private path, and the housekeeping
  thread that sweeps uploads and idle sessions: app.uploads,
  app.housekeeping) and `delete_cache` on the Blocks as a last backstop.
- A tab's unload event marks its sessions closed (app.sessions): their scans
  are released a minute later unless the page reconnects.
- Login (app.login) is part of the launch options too: `launch_kwargs()`
  adds Gradio's password login when users are configured and refuses to
  serve beyond loopback without login; `serve(demo)` (what app.py runs)
  turns that refusal into one line on stderr and exit status 2.
"""

from __future__ import annotations

import os

# Before gradio is imported anywhere through this package.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import sys  # noqa: E402

import gradio as gr  # noqa: E402

from app.display import CSS  # noqa: E402
from app.library_tab import build_library_tab  # noqa: E402
from app.pacs_panel import build_pacs_tab  # noqa: E402
from app.scan_tab import build_scan_tab  # noqa: E402
from app.sessions import on_unload  # noqa: E402
from app.uploads import claim_upload_folder  # noqa: E402
from engine import settings  # noqa: E402

__all__ = ["build_demo", "launch_kwargs", "serve", "LAUNCH_OPTIONS", "DELETE_CACHE"]

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
    # Before any component exists: each one keeps the upload folder it saw when built (GRADIO_CACHE)
    # and copies uploads from elsewhere into it.
    claim_upload_folder()
    from app.login import add_login_header

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        add_login_header()
        # one line: on a 768 px workstation screen every line here pushes the images and answers down
        gr.Markdown(
            "**MedLens** · drop a scan: DICOM files, a folder or .zip of a series, NIfTI, PNG/JPEG/TIFF · research use, not for diagnosis",
            elem_id="ml-header",
        )
        with gr.Tabs() as tabs:  # explicit, so opening a library hit can select the Scan tab
            with gr.Tab("Scan", id="scan"):
                scan = build_scan_tab(model=model, ask_model=ask_model)
            build_library_tab(scan, tabs, model=model)
            build_pacs_tab(scan, tabs, model=model)
        gr.Markdown(  # at the foot of the page: the images and answers come first
            "Privacy: uploads are read, then deleted from the server; loaded scans are released when you leave or after "
            f"{settings.SESSION_IDLE_MIN.get():g} minutes without use; burned-in text is blanked on load; the library "
            "keeps only the de-identified scans you add (a summary, a thumbnail, embeddings, your tags).",
            elem_id="ml-privacy",
        )
        demo.unload(_release_on_close)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_kwargs(**overrides) -> dict:
    """Launch options with the privacy and login settings, plus theme/CSS (Gradio 6 takes them at launch).

    Claims the upload folder (GRADIO_TEMP_DIR) before Gradio creates its app,
    and builds `app_kwargs` afresh each call (Gradio adds to the dict it is given).
    Raises MedLensError when the server must not start (beyond loopback without login; bad credentials file).
    """
    from starlette.middleware import Middleware

    from app.housekeeping import lifespan
    from app.login import login_kwargs
    from app.uploads import UploadPrivacyMiddleware

    claim_upload_folder()
    app_kwargs = {"middleware": [Middleware(UploadPrivacyMiddleware)], "lifespan": lifespan}
    return {**LAUNCH_OPTIONS, "css": CSS, "app_kwargs": app_kwargs, **login_kwargs(overrides), **overrides}


def _release_on_close(request: gr.Request) -> None:
    """The tab closed (or lost its connection): its scans go after a grace minute unless it comes back."""
    on_unload(request)


def serve(demo: gr.Blocks, **overrides) -> None:
    """Launch `demo` as app.py does; a server that must not start says why in one line and exits with status 2."""
    from engine.errors import MedLensError

    try:
        kwargs = launch_kwargs(**overrides)
    except MedLensError as exc:
        print(f"medlens: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    demo.launch(**kwargs)
