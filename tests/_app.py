"""Launch the app for a test: a free localhost port and a private Gradio cache folder.

The private cache lets tests check that nothing derived from an upload is left there.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

# the Library tab's API endpoints (app/library_tab.py)
LIBRARY_API = {
    "/library_search",
    "/library_open",
    "/library_select",
    "/library_add",
    "/library_tag_positive",
    "/library_tag_negative",
    "/library_teach",
    "/library_refresh",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(cache: Path, **build_kwargs) -> Iterator[tuple[str, object]]:
    """(url, demo) of `app.build_demo(**build_kwargs)` served with GRADIO_TEMP_DIR=cache."""
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    import app

    demo = app.build_demo(**build_kwargs)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **app.launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


def plain_value(update):
    """A component update's value (Gradio sends {"__type__": "update", "value": ...} or the bare value)."""
    return update["value"] if isinstance(update, dict) and "__type__" in update else update


def plotly_figure(update) -> dict:
    """The Plotly figure JSON inside a gr.Plot update."""
    import json

    value = plain_value(update)
    assert value["type"] == "plotly"
    return json.loads(value["plot"])
