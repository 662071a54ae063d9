"""The "Ask the scan" panel of the Scan tab: a question in, an answer with its confidence and evidence out.

Design decisions
- UI only: handlers turn widget values into engine.ask calls
  (resolve_ask_model, AskModel.ask, evidence_view) and engine results into
  plotly figures (JSON, never files) and views (PNG data: URLs, like the rest
  of the tab). Nothing derived from the scan goes to Gradio's cache.
- The "Ask model" picker offers the shipped Q-Former checkpoints
  (engine.ask.model.ask_models()) plus the source the app was started with
  (MEDLENS_ASK_MODEL, or build_scan_tab(ask_model=...)). The handler accepts
  only those: a picker value is never a user-typed path. Models load lazily
  on the first question (one per process, engine.ask); with none installed
  the app starts anyway and the panel says what to do.
- A scan is encoded once per model (engine.ask caches encodings by content
  hash), so further questions about the same scan are quick. Asking shares
  the Scan tab's HEAVY concurrency id (one model job at a time on 2 cores).
- Evidence: the queries' attention mapped back to the scan's voxels. The
  answer event keeps it per user in a gr.State as an engine EvidenceView
  (display axial slices, shrunk in-plane to 128 px: a few MB at most) and
  renders it blended into the *current* axial slice (render_view(overlay=
  ...), as the labels panel does) in the panel's own view, so the main
  viewer and the labels panel's evidence are never overwritten. Moving the
  axial slider or the window re-renders it (cheap: no model). A per-slice
  chart shows which axial slices the queries attended to; "Go to the most
  attended slice" moves the viewer there.
- Suggested questions follow the scan shown: the metadata panel changes on
  every new scan/series (its .change event), which also clears the previous
  scan's answer and evidence. Picking a suggestion fills the box and asks.
- Asking runs under app.access.acting("ask"): refused to visitors without
  login on a shared server, one audit line (scan hash, model; never the
  question, which is free text).
- Trust (issue 14): the answer shows its calibrated confidence when the
  model is calibrated (and says "not calibrated" when not), "uncertain"
  instead of a confident answer when its top probability is low, and an
  out-of-distribution warning first when the scan is flagged (AskModel.
  assess: reference-set distance, modality vs the DICOM header).
- Errors (no scan, empty or too long question, a 2D image for a 3D-only
  model, a model that is not installed) are engine MedLensErrors or
  gr.Errors: app.handlers.guarded shows their message, never a trace.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import gradio as gr

from app import handlers
from app.access import acting, entry
from app.display import view_html
from app.sessions import idle_seconds
from app.outcomes import AskOutcome
from app.pickers import model_picker_choices
from engine import settings
from engine.views import render_view

QFORMER_PREFIX = "qformer:"  # labels-panel model values that score labels with a Q-Former (app.labels_panel)
NO_ASK_MODEL_MESSAGE = (
    "**No question-answering model installed.** Asking needs a MedLens Q-Former checkpoint: start the app with "
    "`MEDLENS_ASK_MODEL=local-dir:/path/to/qformer-checkpoint` (see `medlens models`). The viewer works without one."
)
EVIDENCE_PLACEHOLDER = "ask a question: where the model looked is shown here"
OUTPUTS = ("answer", "candidates", "slices", "evidence_view", "evidence", "result", "record")


# --- choices ------------------------------------------------------------------
def ask_model_from_env() -> str | None:
    """The question-answering model source named by MEDLENS_ASK_MODEL, if any."""
    return settings.ASK_MODEL.get()


def ask_model_choices(ask_model: str | None = None) -> tuple[list[tuple[str, str]], str | None]:
    """(label, source) choices for the Ask model picker and the initial value."""
    from engine.ask.model import DEFAULT_ASK_MODEL, ask_models

    choices, value = model_picker_choices(ask_model, ((name, "installed") for name in ask_models()), DEFAULT_ASK_MODEL)
    if value is None and choices:
        value = choices[0][1]
    return choices, value


def qformer_label_choices(ask_choices: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The Q-Former entries of the labels panel's model picker: 3D zero-shot labels over the whole volume."""
    out = []
    for _label, source in ask_choices:
        out.append((f"{source} (3D, Q-Former)", QFORMER_PREFIX + source))
    return out


def is_qformer(model: str | None) -> bool:
    return bool(model) and str(model).startswith(QFORMER_PREFIX)


# --- figures ------------------------------------------------------------------
def candidates_figure(candidates: list[tuple[str, float]]):
    """Horizontal bars of a closed question's ranked candidate answers (best at the top)."""
    import plotly.graph_objects as go

    rows = list(candidates)[::-1]
    fig = go.Figure(
        go.Bar(
            x=[100 * p for _, p in rows],
            y=[a for a, _ in rows],
            orientation="h",
            text=[f"{100 * p:.1f}%" for _, p in rows],
            textposition="auto",
            hovertemplate="%{y}: %{x:.1f}%<extra></extra>",
            marker_color="#1c7ed6",
        )
    )
    fig.update_layout(
        title=dict(text="candidate answers (probability)", font=dict(size=14)),
        xaxis=dict(title="%", range=[0, 100]),
        yaxis=dict(automargin=True),
        height=max(200, 60 + 30 * len(rows)),
        margin=dict(l=10, r=10, t=40, b=40),
    )
    return fig


def slices_figure(weights, current: int | None = None):
    """Attention per axial slice (1 = most inferior, as the viewer's captions count)."""
    import plotly.graph_objects as go

    xs = list(range(1, len(weights) + 1))
    ys = [100 * float(w) for w in weights]
    fig = go.Figure(go.Bar(x=xs, y=ys, marker_color="#d9480f", hovertemplate="axial slice %{x}: %{y:.1f}% of the attention<extra></extra>"))
    if current is not None:
        fig.add_vline(x=current + 1, line_dash="dot", line_color="#868e96")
    fig.update_layout(
        title=dict(text="where the queries looked, per axial slice (1 = most inferior)", font=dict(size=14)),
        xaxis=dict(title="axial slice"),
        yaxis=dict(title="% of attention", rangemode="tozero"),
        height=260,
        margin=dict(l=10, r=10, t=40, b=40),
    )
    return fig


# --- helpers ------------------------------------------------------------------
def _shown_candidates(answer) -> list[tuple[str, float]]:
    """A closed answer's candidates with the probabilities shown: calibrated when the model is."""
    cal = answer.calibrated or {}
    return [(a, cal.get(a, p)) for a, p in answer.candidates]


def _current_scan(session, series):
    scan = handlers._scan(session, series)
    if scan is None:
        raise gr.Error("Upload a scan first, then ask a question about it.", print_exception=False)
    return scan


def _model(model: str | None, allowed: set[str]):
    from engine.ask.api import resolve_ask_model

    if not model:
        raise gr.Error("No question-answering model chosen: " + NO_ASK_MODEL_MESSAGE.replace("**", ""), print_exception=False)
    if model not in allowed:
        raise gr.Error("Choose a question-answering model from the list.", print_exception=False)
    return resolve_ask_model(model)


def _evidence_html(scan, view, volume, axial, center, width, mip, mip_mm) -> str:
    """The current axial slice (2D: the image) with the evidence blended in."""
    from engine.views import plane_sizes

    if view.is_2d or scan.is_2d:
        image = render_view(scan, "image", 0, center, width, size=handlers.VIEW_SIZE * 2, overlay=view.overlay(0))
        return view_html(image, "Evidence", "where the model looked")
    n = plane_sizes(scan)["axial"][0]
    index = min(max(int(axial or 0), 0), n - 1)
    slab = float(mip_mm) if mip and mip_mm else None
    image = render_view(
        scan, "axial", index, center, width, mip_mm=slab, volume=int(volume or 0), size=handlers.VIEW_SIZE, overlay=view.overlay(index)
    )
    caption = f"slice {index + 1}/{n} · where the model looked"
    if index == view.top_slice:
        caption += " (the most attended slice)"
    else:
        caption += f" · most attended: slice {view.top_slice + 1}"
    if scan.n_volumes > 1:
        caption += " · evidence from volume 1"
    return view_html(image, "Evidence", caption)


def _answer_markdown(answer, model_name: str, view, encoder_path: str = "") -> str:
    esc = html.escape
    shown = answer.calibrated_confidence if answer.calibrated_confidence is not None else answer.confidence
    kind = "calibrated" if answer.calibrated_confidence is not None else "not calibrated"
    text = ""
    if answer.ood is not None and answer.ood.out_of_distribution:
        text += (
            "⚠️ **Out of distribution: this scan is unlike what the model was trained on; do not rely on this answer.** "
            + esc("; ".join(answer.ood.reasons))
            + "\n\n"
        )
    if answer.uncertain:
        text += f"**Answer: uncertain** (best guess {esc(answer.answer)}, confidence {100 * shown:.1f}%, {kind})"
    elif answer.closed:
        text += f"**Answer:** {esc(answer.answer)} · confidence **{100 * shown:.1f}%** ({kind})"
    else:
        text += f"**Answer:** {esc(answer.answer)} · confidence {100 * answer.confidence:.1f}% (generated, not calibrated)"
    if answer.closed:
        family = f" ({esc(answer.family.replace('_', ' '))})" if answer.family else ""
        text += f"\n\nClosed question{family}: the answer is the best of {len(answer.candidates)} candidates (chart below)."
    else:
        text += "\n\nOpen question: a generated answer; its confidence is the mean probability of its words."
    if view is not None and not view.is_2d:
        text += f" The queries attended most to axial slice {view.top_slice + 1}/{view.n_slices}."
    encoder = f" · image encoder on {esc(encoder_path)}" if encoder_path else ""
    text += f"\n\nModel `{esc(model_name)}`{encoder} · {esc(answer.trust_note)} · research use only, not a diagnosis."
    return text


def _evidence_for(view, scan):
    """The stored evidence when it belongs to `scan`, else None."""
    return view if view is not None and scan is not None and getattr(view, "scan_hash", None) == scan.content_hash else None


# --- handlers -----------------------------------------------------------------
def make_ask(allowed: set[str]) -> Callable:
    @handlers.guarded(title="Cannot answer this question")
    @acting("ask")
    def ask_question(session, series, volume, model, question, axial, center, width, mip, mip_mm) -> dict[str, Any]:
        """Answer a question about the scan shown: answer text, candidates chart, per-slice chart, evidence view, JSON."""
        from engine.ask.api import evidence_view
        from engine.ask.questions import validate_question

        scan = _current_scan(session, series)
        entry().scan(scan)
        cleaned = validate_question("" if question is None else question)  # before any model is loaded
        ask = _model(model, allowed)
        entry().model = ask
        answer = ask.ask(scan, cleaned)
        view = evidence_view(scan, answer.evidence) if answer.evidence is not None else None
        out: dict[str, Any] = {
            "answer": _answer_markdown(answer, ask.name, view, ask.encoders.path_label(scan.is_2d)),
            "candidates": gr.update(value=candidates_figure(_shown_candidates(answer)), visible=True)
            if answer.closed and answer.candidates
            else gr.update(value=None, visible=False),
            "evidence": view,
            "result": {
                **answer.to_dict(),
                "model": ask.name,
                "encoder_path": ask.encoders.path_label(scan.is_2d),
                "most_attended_axial_slice": None if view is None or view.is_2d else view.top_slice,
            },
        }
        out["record"] = AskOutcome(scan.content_hash, out["result"], ask.name, getattr(ask, "revision", ""))
        if view is None:
            out["slices"] = gr.update(value=None, visible=False)
            out["evidence_view"] = view_html(None, "Evidence", "no evidence for this answer")
            return out
        current = None if view.is_2d else min(max(int(axial or 0), 0), view.n_slices - 1)
        out["slices"] = (
            gr.update(value=slices_figure(view.slice_weights, current), visible=True)
            if not view.is_2d
            else gr.update(value=None, visible=False)
        )
        out["evidence_view"] = _evidence_html(scan, view, volume, axial, center, width, mip, mip_mm)
        return out

    return ask_question


def make_ask_suggested(allowed: set[str]) -> Callable:
    inner = make_ask(allowed)

    @acting(None)  # the inner ask records the line, as this user
    def ask_suggested(session, series, volume, model, suggestion, axial, center, width, mip, mip_mm) -> dict[str, Any]:
        """A suggested question was picked: it goes into the question box and is asked."""
        if not suggestion:
            return {}
        return {"question": suggestion, **inner(session, series, volume, model, suggestion, axial, center, width, mip, mip_mm)}

    return ask_suggested


@handlers.guarded(title="Cannot suggest questions")
def ask_suggestions(session, series, model) -> dict[str, Any]:
    """A new scan or series is shown: questions suggested for its modality; the previous answer and evidence go."""
    from engine.ask.questions import suggested_questions

    scan = handlers._scan(session, series)
    suggestions = suggested_questions(scan.modality.value, scan.metadata.get("BodyPartExamined")) if scan is not None else []
    return {
        "suggested": gr.update(choices=suggestions, value=None),
        "answer": "" if model else NO_ASK_MODEL_MESSAGE,
        "candidates": gr.update(value=None, visible=False),
        "slices": gr.update(value=None, visible=False),
        "evidence_view": view_html(None, "Evidence", EVIDENCE_PLACEHOLDER),
        "evidence": None,
        "result": None,
        "record": None,
    }


@handlers.guarded(title="Cannot show the evidence")
def ask_evidence(session, series, volume, axial, center, width, mip, mip_mm, evidence):
    """The axial slice or the window changed: redraw the evidence on the current axial slice (no change without an answer)."""
    scan = handlers._scan(session, series)
    view = _evidence_for(evidence, scan)
    if view is None:
        return gr.update()
    return _evidence_html(scan, view, volume, axial, center, width, mip, mip_mm)


@handlers.guarded(title="Cannot go to that slice")
def ask_goto_slice(session, series, volume, center, width, mip, mip_mm, evidence):
    """Move the viewer's axial slice to the one the queries attended to most (and redraw both views)."""
    scan = handlers._scan(session, series)
    view = _evidence_for(evidence, scan)
    if scan is None or view is None:
        raise gr.Error("Ask a question about the scan shown first.", print_exception=False)
    if view.is_2d:
        return gr.update(), gr.update(), gr.update()
    index = view.top_slice
    slab = float(mip_mm) if mip and mip_mm else None
    return (
        gr.update(value=index),
        handlers._view_html(scan, "axial", index, center, width, slab, int(volume or 0)),
        _evidence_html(scan, view, volume, index, center, width, mip, mip_mm),
    )


# --- layout and wiring --------------------------------------------------------------
def build_ask_panel(c: dict[str, Any], ask_choices: tuple[list[tuple[str, str]], str | None]) -> set[str]:
    """Create the panel inside the current Blocks context (components into `c`); returns the allowed model sources."""
    choices, value = ask_choices
    with gr.Column(elem_id="ml-ask"):  # a tab of the Scan tab's panels (app.scan_tab)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=280):
                c["ask_model"] = gr.Dropdown(label="Ask model", choices=choices, value=value, elem_id="ml-ask-model")
                c["ask_suggested"] = gr.Dropdown(
                    label="Suggested questions (for this scan's modality; picking one asks it)",
                    choices=[],
                    value=None,
                    elem_id="ml-ask-suggested",
                )
                c["ask_question"] = gr.Textbox(
                    label="Question (any language; at most 500 characters)",
                    placeholder="e.g. Is the liver visible?  (Enter asks)",
                    lines=1,
                    max_lines=1,
                    elem_id="ml-ask-question",
                )
                c["ask_run"] = gr.Button("Ask", variant="primary", elem_id="ml-ask-run")
                c["ask_answer"] = gr.Markdown("" if value else NO_ASK_MODEL_MESSAGE, label="answer", elem_id="ml-ask-answer")
                c["ask_candidates"] = gr.Plot(label="Candidate answers", visible=False, elem_id="ml-ask-candidates")
                with gr.Accordion("Answer as JSON", open=False):
                    c["ask_result"] = gr.JSON(label="Answer", elem_id="ml-ask-result")
            with gr.Column(scale=3, min_width=280):
                c["ask_evidence_view"] = gr.HTML(
                    view_html(None, "Evidence", EVIDENCE_PLACEHOLDER), label="evidence view", elem_id="ml-ask-evidence"
                )
                c["ask_goto"] = gr.Button("Go to the most attended slice", size="sm", elem_id="ml-ask-goto")
                c["ask_slices"] = gr.Plot(label="Attention per axial slice", visible=False, elem_id="ml-ask-slices")
        # evidence is only shown over its scan, which is released after the idle timeout (app.sessions)
        c["ask_evidence"] = gr.State(None, time_to_live=idle_seconds())
        c["ask_record"] = gr.State(None, time_to_live=idle_seconds())  # the last answer, server-side (app.outcomes)
    return {v for _, v in choices}


def _ordered(fn: Callable[..., dict[str, Any]], names: tuple[str, ...]) -> Callable[..., tuple]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args):
        out = fn(*args)
        return tuple(out.get(name, gr.update()) for name in names)

    return wrapper


def wire_ask_panel(c: dict[str, Any], allowed: set[str], heavy: str = "heavy", render: str = "render") -> None:
    outputs = [c[f"ask_{name}"] for name in OUTPUTS]
    inputs = [
        c["state"],
        c["series"],
        c["volume"],
        c["ask_model"],
        c["ask_question"],
        c["axial_slider"],
        c["center"],
        c["width"],
        c["mip"],
        c["mip_mm"],
    ]
    heavy_kwargs = dict(concurrency_limit=1, concurrency_id=heavy)
    gr.on(
        triggers=[c["ask_run"].click, c["ask_question"].submit],
        fn=_ordered(make_ask(allowed), OUTPUTS),
        inputs=inputs,
        outputs=outputs,
        api_name="ask_question",
        **heavy_kwargs,
    )
    suggested_inputs = list(inputs)
    suggested_inputs[4] = c["ask_suggested"]
    c["ask_suggested"].input(
        _ordered(make_ask_suggested(allowed), ("question",) + OUTPUTS),
        inputs=suggested_inputs,
        outputs=[c["ask_question"], *outputs],
        api_name="ask_suggested",
        **heavy_kwargs,
    )
    c["metadata"].change(
        _ordered(ask_suggestions, ("suggested",) + OUTPUTS),
        inputs=[c["state"], c["series"], c["ask_model"]],
        outputs=[c["ask_suggested"], *outputs],
        api_name="ask_suggestions",
        concurrency_limit=2,
        concurrency_id=render,
        show_progress="hidden",
    )
    gr.on(
        triggers=[c["axial_slider"].release, c["center"].change, c["width"].change, c["mip"].change, c["mip_mm"].change],
        fn=ask_evidence,
        inputs=[c["state"], c["series"], c["volume"], c["axial_slider"], c["center"], c["width"], c["mip"], c["mip_mm"], c["ask_evidence"]],
        outputs=[c["ask_evidence_view"]],
        api_name="ask_evidence",
        trigger_mode="always_last",
        concurrency_limit=2,
        concurrency_id=render,
        show_progress="hidden",
    )
    c["ask_goto"].click(
        ask_goto_slice,
        inputs=[c["state"], c["series"], c["volume"], c["center"], c["width"], c["mip"], c["mip_mm"], c["ask_evidence"]],
        outputs=[c["axial_slider"], c["axial_view"], c["ask_evidence_view"]],
        api_name="ask_goto_slice",
        concurrency_limit=2,
        concurrency_id=render,
        show_progress="hidden",
    )
