"""The "Scan" tab: upload, series picker, three orthogonal views, window, MIP, metadata, Ask the scan, zero-shot labels.

Design decisions
- Per-user data (the loaded scans) live only in a gr.State; nothing is
  global. Slice, window and MIP changes re-render from that state.
- Views are gr.HTML holding PNG `data:` URLs (see app.display): nothing
  derived from the scan is written to Gradio's cache.
- Model events share the HEAVY concurrency id with limit 1 (2 cores).
  Loading has its own queue (LOAD, two at a time): a 2,000-slice series
  being read must not hold up other users' labels and answers, and its
  memory is reserved against the server's budget before decoding
  (engine.memory). Rendering is a few ms per view and gets its own pool.
- Loaded scans live in a ScanSession (app.sessions): released after
  MEDLENS_SESSION_IDLE_MIN without use or a minute after the tab closes.
- Slider events use `.input` (user moves only, so a programmatic update
  after loading does not render twice) with trigger_mode "always_last":
  while dragging, renders never pile up; the last position always renders.
- Every event has an explicit api_name: they are the app's API for
  gradio_client and the tests.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import gradio as gr

from app import handlers
from app.components import UploadFile
from app.display import view_html
from engine.scan import Modality
from engine.views import PLANES
from engine.windowing import CT_DEFAULT, CUSTOM, PRESETS, window_names

HEAVY = "heavy"  # concurrency id of CPU-heavy events (one at a time on 2 cores)
LOAD = "load"  # uploads have their own queue: a big series being read does not hold up others' labels and answers
LOAD_CONCURRENCY = 2  # loads at once; their memory is bounded by engine.memory's budget, reserved before decoding
RENDER = "render"
# Gradio's own expiry of the State (counted from its last write, not its last use): only a backstop
# for the empty shell. The scans themselves are released after MEDLENS_SESSION_IDLE_MIN without use,
# or a minute after the tab closes (app.sessions).
STATE_TTL_S = 4 * 3600

# order of the outputs of load_files / select_series
SERIES_OUTPUTS = (
    "state",
    "series",
    "volume",
    "preset",
    "center",
    "width",
    "axial_slider",
    "coronal_slider",
    "sagittal_slider",
    "axial_view",
    "coronal_view",
    "sagittal_view",
    "metadata",
    "warnings",
    "coronal_column",
    "sagittal_column",
    "mip_row",
)


def _ordered(fn: Callable[..., dict[str, Any]], names: tuple[str, ...]) -> Callable[..., tuple]:
    """Adapt a handler returning {name: value} to Gradio's positional outputs."""

    @functools.wraps(fn)  # keeps the parameter names Gradio shows in the API page
    def wrapper(*args):
        out = fn(*args)
        return tuple(out.get(name, gr.update()) for name in names)

    return wrapper


def build_scan_tab(model: str | None = None, ask_model: str | None = None) -> dict[str, gr.components.Component]:
    """Create the tab's components inside the current Blocks context and wire their events.

    model: the model source the zero-shot labels panel offers first (None: the
    shipped default if installed; the panel says so when there is none).
    ask_model: the question-answering (Q-Former) source the Ask panel offers
    first (None: $MEDLENS_ASK_MODEL, else the shipped Q-Formers); the labels
    panel offers the same Q-Formers for 3D zero-shot labels.
    """
    from app.ask_panel import ask_model_choices, ask_model_from_env, build_ask_panel, wire_ask_panel

    ask_choices = ask_model_choices(ask_model or ask_model_from_env())
    c: dict[str, Any] = {}
    c["state"] = gr.State(None, time_to_live=STATE_TTL_S)
    ct = PRESETS[CT_DEFAULT]
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            c["files"] = UploadFile(
                label="Scan files: DICOM, NIfTI, PNG/JPEG/TIFF, or a .zip of them",
                file_count="multiple",
                type="filepath",
                height=120,  # compact: the views and answers need the vertical space
                elem_id="ml-files",
            )
            c["folder"] = UploadFile(label="…or a whole folder", file_count="directory", type="filepath", height=120, elem_id="ml-folder")
            c["series"] = gr.Dropdown(label="Series", choices=[], value=None, interactive=False, elem_id="ml-series")
            c["volume"] = gr.Slider(label="Volume", minimum=0, maximum=1, step=1, value=0, visible=False, elem_id="ml-volume")
            c["preset"] = gr.Dropdown(
                label="Window preset",
                choices=window_names(Modality.CT) + [CUSTOM],
                value=CT_DEFAULT,
                elem_id="ml-preset",
            )
            c["center"] = gr.Slider(
                label="Window centre (level)", minimum=-1024, maximum=3071, step=1, value=ct.center, elem_id="ml-center"
            )
            c["width"] = gr.Slider(label="Window width", minimum=1, maximum=4095, step=1, value=ct.width, elem_id="ml-width")
            with gr.Row() as c["mip_row"]:
                c["mip"] = gr.Checkbox(label="MIP (maximum intensity projection)", value=False, elem_id="ml-mip")
                c["mip_mm"] = gr.Slider(label="MIP slab (mm)", minimum=1, maximum=100, step=1, value=20, elem_id="ml-mip-mm")
            # collapsed: the images and the answers come first; the header details are one click away
            with gr.Accordion("Scan information (de-identified)", open=False, elem_id="ml-metadata-box"):
                c["metadata"] = gr.JSON(label="Scan information (de-identified)", elem_id="ml-metadata")
        with gr.Column(scale=4):
            with gr.Row(equal_height=False):
                for plane in PLANES:
                    with gr.Column(min_width=200) as c[f"{plane}_column"]:
                        c[f"{plane}_view"] = gr.HTML(
                            view_html(None, plane.capitalize(), "no scan loaded: upload files, a .zip or a folder"),
                            label=f"{plane} view",  # names the output in the API page
                            elem_id=f"ml-{plane}-view",
                        )
                        c[f"{plane}_slider"] = gr.Slider(
                            label=f"{plane.capitalize()} slice",
                            minimum=0,
                            maximum=1,
                            step=1,
                            value=0,
                            elem_id=f"ml-{plane}-slider",
                        )
            c["warnings"] = gr.Markdown("", label="warnings", elem_id="ml-warnings")
            # the two main panels, directly under the views
            with gr.Tabs(elem_id="ml-panels"):
                with gr.Tab("Zero-shot labels", id="labels"):
                    from app.labels_panel import build_labels_panel

                    build_labels_panel(c, model=model, heavy=HEAVY, ask_choices=ask_choices[0])
                with gr.Tab("Ask the scan", id="ask"):
                    ask_allowed = build_ask_panel(c, ask_choices)
    _wire(c)
    wire_ask_panel(c, ask_allowed, heavy=HEAVY, render=RENDER)
    _wire_model_view(c)
    return c


def _wire_model_view(c: dict[str, Any]) -> None:
    """After labelling, show the chosen model's input for the slice shown (app.model_view)."""
    from app.model_view import make_model_view

    allowed = {value for _, value in c["lp_model"].choices}
    c["lp_run"].click(
        make_model_view(allowed),
        inputs=[c["state"], c["series"], c["lp_model"], c["axial_slider"]],
        outputs=[c["lp_model_view"]],
        api_name="model_view",
        concurrency_limit=2,
        concurrency_id=RENDER,
        show_progress="hidden",
    )


def _wire(c: dict[str, Any]) -> None:
    series_outputs = [c[name] for name in SERIES_OUTPUTS]
    load = _ordered(handlers.load_files, SERIES_OUTPUTS + ("files",))
    for source, api_name in ((c["files"], "load_files"), (c["folder"], "load_folder")):
        source.upload(
            load,
            inputs=[source],
            outputs=series_outputs + [source],
            api_name=api_name,
            concurrency_limit=LOAD_CONCURRENCY,
            concurrency_id=LOAD,
            # progress (and, on failure, the error badge) on the upload widget only: a failed
            # upload must not cover the views of the scan already shown
            show_progress="full",
            show_progress_on=[source],
        )
    c["series"].input(
        _ordered(handlers.select_series, SERIES_OUTPUTS),
        inputs=[c["state"], c["series"]],
        outputs=series_outputs,
        api_name="select_series",
        concurrency_limit=1,
        concurrency_id=HEAVY,
    )

    views = [c[f"{p}_view"] for p in PLANES]
    sliders = [c[f"{p}_slider"] for p in PLANES]
    mip = [c["mip"], c["mip_mm"]]
    render_kwargs = dict(concurrency_limit=2, concurrency_id=RENDER, show_progress="hidden")
    for plane in PLANES:
        c[f"{plane}_slider"].input(
            handlers.render_plane(plane),
            inputs=[c["state"], c["series"], c["volume"], c[f"{plane}_slider"], c["center"], c["width"], *mip],
            outputs=[c[f"{plane}_view"]],
            api_name=f"render_{plane}",
            trigger_mode="always_last",
            **render_kwargs,
        )
    all_inputs = [c["state"], c["series"], c["volume"], *sliders, c["center"], c["width"], *mip]
    c["volume"].input(
        handlers.render_views, inputs=all_inputs, outputs=views, api_name="select_volume", trigger_mode="always_last", **render_kwargs
    )
    c["mip"].input(handlers.render_views, inputs=all_inputs, outputs=views, api_name="set_mip", **render_kwargs)
    c["mip_mm"].input(
        handlers.render_views, inputs=all_inputs, outputs=views, api_name="set_mip_slab", trigger_mode="always_last", **render_kwargs
    )
    for name in ("center", "width"):
        c[name].input(
            handlers.set_window,
            inputs=all_inputs,
            outputs=[c["preset"], *views],
            api_name=f"set_window_{name}",
            trigger_mode="always_last",
            **render_kwargs,
        )
    c["preset"].input(
        handlers.set_preset,
        inputs=[c["state"], c["series"], c["preset"], c["volume"], *sliders, *mip],
        outputs=[c["center"], c["width"], *views],
        api_name="set_preset",
        **render_kwargs,
    )
