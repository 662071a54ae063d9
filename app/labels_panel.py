"""The zero-shot labels panel of the Scan tab: labels in, a ranked chart out.

Design decisions
- UI only: handlers turn widget values into engine.zeroshot calls
  (label_scan, evidence_map) and engine results into plotly figures (sent
  as JSON, so nothing patient-derived lands in Gradio's cache) and views
  (PNG data: URLs, like the rest of the tab).
- The model picker offers `engine.models.list_models()` plus the source the
  app was started with (MEDLENS_MODEL / build_demo(model=...)). The handler
  accepts only those: a picker value is never a user-typed path, so nobody
  can make the server load a folder of their choosing. Models load lazily
  on the first labelling (one model per process, engine.models); with none
  installed the app starts anyway and the panel says what to do.
- Labelling and evidence maps are heavy (model forwards): they share the
  Scan tab's HEAVY concurrency id (one at a time on 2 cores). The preset
  picker only fills the text box.
- Evidence: "show evidence for <label>" renders a heat map of the selected
  label on the current axial slice (2D: on the image), computed on the
  model's view of that slice (default window) and blended into the user's
  view (their window) through render_view(overlay=...). Moving the axial
  slider with evidence on recomputes it for the new slice.
- The picker also lists the Q-Formers of the Ask panel as "<source> (3D,
  Q-Former)" (value "qformer:<source>"): they score the label list over the
  whole volume at once (engine.ask.api.label_volume, the same result shape),
  so there is no per-slice chart and no per-label evidence map for them
  (the Ask panel shows where a Q-Former looked); the status line says so.
  Everything else (the CLIP path) is unchanged.
- Labelling runs under app.access.acting("label"): refused to visitors
  without login on a shared server, one audit line (scan hash, model).
- Trust (issue 14): the bars show the reported probability (calibrated
  when the model is, bounded by the field-of-view check for organs in
  volumes), coloured by verdict, over a shaded uncertain band; the status
  says "not calibrated" when the model is not, which field of view the
  volume was read as and why, each bounded label's reason, and an
  out-of-distribution warning first when the scan is flagged. The check
  runs as $MEDLENS_FOV_CHECK says (default auto: the app's Q-Former).
- Engine errors (MedLensError: model, prompts, scan, heat maps) become
  gr.Error with their message, HTML-escaped; anything else is handled by
  app.handlers.guarded (logged, generic message, never a trace).
"""

from __future__ import annotations

import html
from typing import Any, Callable

import gradio as gr

from app import handlers
from app.access import acting
from app.access import entry as audit_line
from app.ask_panel import QFORMER_PREFIX, is_qformer, qformer_label_choices
from app.model_view import PLACEHOLDER as MODEL_VIEW_PLACEHOLDER
from app.model_view import TITLE as MODEL_VIEW_TITLE
from app.display import view_html
from app.outcomes import LabelOutcome
from app.pickers import model_picker_choices
from engine import settings
from engine.views import plane_sizes, render_view

AUTO = "auto"
NO_MODEL_MESSAGE = (
    "**No model installed.** Zero-shot labels need a CLIP-style model: start the app with "
    "`MEDLENS_MODEL=local-dir:/path/to/checkpoint` (a MedLens, open_clip or UniMed-CLIP folder; "
    "see `medlens models`), or pick a hub model below (needs the internet the first time). "
    "The viewer works without one."
)
MODE_CHOICES = [("Softmax over labels (pick one)", "softmax"), ("Present / absent per label (findings)", "present-absent")]
AGG_CHOICES = [("Mean over slices", "mean"), ("Max over slices", "max")]


# --- choices ------------------------------------------------------------------
def model_choices(model: str | None = None) -> tuple[list[tuple[str, str]], str | None]:
    """(label, source) choices for the model picker and the initial value."""
    from engine.models import DEFAULT_MODEL, list_models

    # shipped and known-hub names are both accepted by load_model
    offered = ((entry.name, "installed" if entry.available_offline else "downloads on first use") for entry in list_models())
    return model_picker_choices(model, offered, DEFAULT_MODEL)


def preset_choices() -> list[tuple[str, str]]:
    """("X-ray · chest findings", "xray/chest findings") for every label set of every modality."""
    from engine.zeroshot import all_prompt_sets

    return [(f"{ps.title} · {name}", f"{ps.key}/{name}") for ps in all_prompt_sets() for name in ps.label_sets]


def prompt_set_choices() -> list[tuple[str, str]]:
    from engine.zeroshot import all_prompt_sets

    return [("Auto (from the scan's modality)", AUTO)] + [(ps.title, ps.key) for ps in all_prompt_sets()]


# --- figures ------------------------------------------------------------------
VERDICT_COLOURS = {
    "present": "#d9480f",
    "most probable": "#d9480f",
    "uncertain": "#868e96",
    "absent": "#1c7ed6",
    "less probable": "#f08c00",
}


def _shown(row: dict[str, Any]) -> float:
    """The reported probability (calibrated, bounded by the field of view); the raw one in older results."""
    return row.get("reported_probability", row["probability"])


def bar_figure(result: dict[str, Any]):
    """Horizontal bars of the reported probabilities (best at the top), coloured by verdict, the uncertain band shaded."""
    import plotly.graph_objects as go

    rows = result["labels"][::-1]
    present_absent = result["mode"] == "present-absent"
    fig = go.Figure(
        go.Bar(
            x=[100 * _shown(r) for r in rows],
            y=[r["label"] for r in rows],
            orientation="h",
            text=[f"{100 * _shown(r):.1f}%" + (" uncertain" if r.get("uncertain") else "") for r in rows],
            textposition="auto",
            customdata=[[r["score"], 100 * r["probability"], r.get("verdict") or ""] for r in rows],
            hovertemplate="%{y}: %{x:.1f}% (%{customdata[2]})<br>model %{customdata[1]:.1f}%, cosine %{customdata[0]:.4f}<extra></extra>",
            marker_color=[VERDICT_COLOURS.get(r.get("verdict") or "", "#d9480f") for r in rows],
        )
    )
    what = "P(present) per label" if present_absent else "probability (softmax over labels)"
    what += ", calibrated" if result.get("calibrated") else ", not calibrated"
    if result.get("scope") == "volume":
        what += ", whole volume (3D Q-Former)"
    elif result.get("scope") == "image":
        what += ", whole image (Q-Former)"
    if result.get("aggregation"):
        what += f", {result['aggregation']} over {result['n_slices']} slices"
    if present_absent:  # the uncertain band: no confident number inside it
        fig.add_vrect(
            x0=35, x1=65, fillcolor="#868e96", opacity=0.15, line_width=0, annotation_text="uncertain", annotation_position="top left"
        )
    else:
        fig.add_vline(x=50, line_dash="dot", line_color="#868e96", annotation_text="uncertain below", annotation_position="top left")
    fig.update_layout(
        title=dict(text=what, font=dict(size=14)),
        xaxis=dict(title="%", range=[0, 100]),
        yaxis=dict(automargin=True),
        height=max(220, 60 + 32 * len(rows)),
        margin=dict(l=10, r=10, t=40, b=40),
    )
    return fig


def trust_markdown(result: dict[str, Any]) -> str:
    """What the numbers can be trusted with: OOD warning first, then calibration, field of view, bounded labels."""
    esc = html.escape
    lines = []
    if result.get("out_of_distribution"):
        lines.append(
            "⚠️ **Out of distribution: this scan is unlike what the model was trained on; do not rely on these labels.** "
            + esc("; ".join(result.get("ood_reasons") or []))
        )
    if result.get("trust"):
        lines.append(esc(result["trust"]).replace("not calibrated", "**not calibrated**", 1))
    fov = result.get("field_of_view")
    if fov:
        lines.append(
            f"Field of view: **{esc(fov['main_region'])}** ({100 * fov['main_region_probability']:.0f}%): "
            + esc("; ".join(fov.get("evidence") or []))
        )
    elif result.get("fov_note"):
        lines.append(esc(result["fov_note"]))
    lines += [f"- {esc(reason)}" for row in result["labels"] for reason in row.get("reasons") or []]
    return "\n\n".join(lines)


def top_line(result: dict[str, Any]) -> str:
    top = result["labels"][0]
    if result["mode"] == "present-absent":
        present = [r for r in result["labels"] if r.get("verdict") == "present"]
        found = ", ".join(f"**{html.escape(r['label'])}** ({100 * _shown(r):.1f}%)" for r in present) or "none"
        return f"Present: {found}"
    if top.get("uncertain"):
        return f"Top: **uncertain** (best guess {html.escape(top['label'])}, {100 * _shown(top):.1f}%)"
    return f"Top: **{html.escape(top['label'])}** ({100 * _shown(top):.1f}%)"


def slice_figure(result: dict[str, Any]):
    """Per-slice probability of each label (volumes), in slice order."""
    import plotly.graph_objects as go

    slices = result.get("per_slice") or []
    fig = go.Figure()
    xs = [f"{s['plane']} {s['index']}" for s in slices]
    for row in result["labels"]:
        label = row["label"]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[100 * s["probabilities"][label] for s in slices],
                mode="lines+markers",
                name=label,
                hovertemplate=f"{html.escape(label)}<br>%{{x}}: %{{y:.1f}}%<extra></extra>",
            )
        )
    fig.update_layout(
        title=dict(text="per slice (slice index along the plane; axial 0 = most inferior)", font=dict(size=14)),
        xaxis=dict(title="slice", type="category"),
        yaxis=dict(title="%", range=[0, 100]),
        height=320,
        margin=dict(l=10, r=10, t=40, b=40),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


# --- handlers -----------------------------------------------------------------
def fill_preset(preset: str | None) -> tuple[str, str]:
    """A preset label set was picked: its labels (one per line) and its prompt set."""
    from engine.zeroshot import load_prompt_set

    if not preset or "/" not in preset:
        return gr.update(), gr.update()
    key, name = preset.split("/", 1)
    pset = load_prompt_set(key)
    if name not in pset.label_sets:
        raise gr.Error(f"unknown preset {html.escape(preset)}", print_exception=False)
    return "\n".join(pset.label_sets[name]), key


def make_label_scan(allowed_models: set[str]) -> Callable:
    @handlers.guarded(title="Cannot label this scan")
    @acting("label")
    def label_scan(session, series, volume, model, prompt_set, labels, mode, aggregation, planes, n_slices):
        """Zero-shot labels for the scan shown: bar chart, per-slice chart, result JSON, evidence choices, status."""
        from engine.zeroshot import clean_labels, label_scan as engine_label_scan

        scan = handlers._scan(session, series)
        if scan is None:
            raise gr.Error("Upload a scan first.", print_exception=False)
        if not model:
            raise gr.Error("No model chosen: " + NO_MODEL_MESSAGE.replace("**", ""), print_exception=False)
        if model not in allowed_models:
            raise gr.Error("Choose a model from the list.", print_exception=False)
        audit_line().scan(scan).model = model
        if labels is not None and str(labels).strip():
            label_list = clean_labels(str(labels))
        else:
            label_list = None  # the modality's preset
        if is_qformer(model):
            outputs = _label_with_qformer(scan, label_list, model, prompt_set, mode, volume)
            return (*outputs, LabelOutcome(scan.content_hash, outputs[2], model, prompt_set))
        result = engine_label_scan(
            scan,
            label_list,
            model,
            prompt_set=None if prompt_set in (None, "", AUTO) else prompt_set,
            mode=mode or "softmax",
            aggregation=aggregation or "mean",
            planes=tuple(planes or ("axial",)),
            n_slices=int(n_slices or 12),
            volume=int(volume or 0),
            volume_model=settings.ASK_MODEL.get(),  # the field-of-view check reads the app's Q-Former
        )
        audit_line().model = result.model_id  # name@revision
        data = result.to_dict()
        names = [r["label"] for r in data["labels"]]
        status = (
            f"{top_line(data)} · model `{html.escape(result.model_id)}` "
            f"({html.escape(result.inference_path)}) · prompts: {html.escape(result.prompt_set)}"
        )
        if result.aggregation:
            status += f" · {result.aggregation} over {len(result.per_slice)} slices"
        status += "\n\n" + trust_markdown(data)
        return (
            bar_figure(data),
            gr.update(value=slice_figure(data), visible=bool(result.per_slice)),
            data,
            gr.update(choices=names, value=names[0]),
            status,
            LabelOutcome(scan.content_hash, data, model, prompt_set),  # server-side, for "send results to PACS"
        )

    return label_scan


def _label_with_qformer(scan, label_list, model, prompt_set, mode, volume):
    """The label_scan outputs for a Q-Former choice: one score per label over the whole volume."""
    from engine.ask.api import label_volume

    if mode not in (None, "", "softmax"):
        raise gr.Error(
            "The 3D Q-Former ranks labels as a softmax over the list: choose 'Softmax over labels' as the scoring.",
            print_exception=False,
        )
    data = label_volume(
        scan,
        label_list,
        model[len(QFORMER_PREFIX) :],
        prompt_set=None if prompt_set in (None, "", AUTO) else prompt_set,
        volume=int(volume or 0),
    )
    whole = "the whole image" if scan.is_2d else "the whole volume at once"
    status = (
        f"{top_line(data)} · model `{html.escape(data['model'])}` "
        f"(Q-Former) · scored over {whole}: no per-slice chart and no per-label evidence map for this model "
        "(the Ask panel shows where it looked)\n\n" + trust_markdown(data)
    )
    return (
        bar_figure(data),
        gr.update(value=None, visible=False),
        data,
        gr.update(choices=[], value=None),
        status,
    )


def make_show_evidence(allowed_models: set[str], api_name: str) -> Callable:
    @handlers.guarded(title="Cannot show evidence")
    def show_evidence(session, series, volume, axial, center, width, mip, mip_mm, model, prompt_set, label, show):
        """The axial view (2D: the image), with the evidence heat map for `label` when `show` is on."""
        from engine.zeroshot import evidence_map

        scan = handlers._scan(session, series)
        if scan is None:
            return view_html(None, "Axial", "no scan loaded: upload files, a .zip or a folder") if show else gr.update()
        slab = float(mip_mm) if mip and mip_mm else None
        if not show:
            return handlers._view_html(scan, "axial", int(axial or 0), center, width, slab, int(volume or 0))
        if is_qformer(model):
            raise gr.Error(
                "Per-label evidence maps need a CLIP model (pick one in the Model list); "
                "for the 3D Q-Former, the Ask panel shows where it looked.",
                print_exception=False,
            )
        if not label:
            raise gr.Error("Label the scan first, then pick the label to show evidence for.", print_exception=False)
        if not model or model not in allowed_models:
            raise gr.Error("Choose a model from the list.", print_exception=False)
        pset = None if prompt_set in (None, "", AUTO) else prompt_set
        if scan.is_2d:
            heat = evidence_map(scan, label, model, prompt_set=pset, plane="image")
            image = render_view(scan, "image", 0, center, width, size=handlers.VIEW_SIZE * 2, overlay=heat)
            return view_html(image, "Image", f"evidence for '{label}'")
        n = plane_sizes(scan)["axial"][0]
        index = min(max(int(axial or 0), 0), n - 1)
        heat = evidence_map(scan, label, model, prompt_set=pset, plane="axial", index=index, volume=int(volume or 0))
        # the heat map is of the plain slice; with MIP on, the view shows the slab with it
        image = render_view(
            scan, "axial", index, center, width, mip_mm=slab, volume=int(volume or 0), size=handlers.VIEW_SIZE, overlay=heat
        )
        return view_html(image, "Axial", f"slice {index + 1}/{n} · evidence for '{label}'")

    show_evidence.__name__ = api_name
    return show_evidence


def make_evidence_on_slice(allowed_models: set[str]) -> Callable:
    inner = make_show_evidence(allowed_models, "evidence_slice")

    def evidence_slice(session, series, volume, axial, center, width, mip, mip_mm, model, prompt_set, label, show):
        """The axial slider was released: redo the evidence map on the new slice (no change when evidence is off)."""
        if not show or is_qformer(model):
            return gr.update()
        return inner(session, series, volume, axial, center, width, mip, mip_mm, model, prompt_set, label, show)

    return evidence_slice


# --- layout and wiring -------------------------------------------------------------
def build_labels_panel(
    c: dict[str, Any], model: str | None = None, heavy: str = "heavy", ask_choices: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """Create the panel inside the current Blocks context; `c` holds the Scan tab's components.

    ask_choices: the Ask panel's (label, source) Q-Former choices, offered as 3D zero-shot label models.
    """
    choices, value = model_choices(model)
    installed = value is not None
    choices = choices + qformer_label_choices(ask_choices or [])
    allowed = {v for _, v in choices}
    with gr.Column(elem_id="ml-labels"):  # a tab of the Scan tab's panels (app.scan_tab)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                c["lp_model"] = gr.Dropdown(
                    label="Model",
                    choices=choices,
                    value=value,
                    info="CLIP models score sampled slices; '(3D, Q-Former)' models score the whole volume at once (no per-slice chart)",
                    elem_id="ml-lp-model",
                )
                c["lp_preset"] = gr.Dropdown(label="Preset label set", choices=preset_choices(), value=None, elem_id="ml-lp-preset")
                c["lp_labels"] = gr.Textbox(
                    label="Labels (one per line or comma-separated; empty = the modality's preset)",
                    lines=5,
                    placeholder="pneumonia\npleural effusion\nnormal",
                    elem_id="ml-lp-labels",
                )
                c["lp_prompt_set"] = gr.Dropdown(
                    label="Prompt set (modality wording)", choices=prompt_set_choices(), value=AUTO, elem_id="ml-lp-prompts"
                )
                c["lp_mode"] = gr.Radio(label="Scoring", choices=MODE_CHOICES, value="softmax", elem_id="ml-lp-mode")
                with gr.Accordion("Volumes", open=False):
                    c["lp_aggregation"] = gr.Radio(label="Combine slices by", choices=AGG_CHOICES, value="mean", elem_id="ml-lp-agg")
                    c["lp_planes"] = gr.CheckboxGroup(
                        label="Planes to sample", choices=["axial", "coronal", "sagittal"], value=["axial"], elem_id="ml-lp-planes"
                    )
                    c["lp_slices"] = gr.Slider(label="Slices per plane", minimum=1, maximum=32, step=1, value=12, elem_id="ml-lp-slices")
                c["lp_run"] = gr.Button("Label this scan", variant="primary", elem_id="ml-lp-run")
                with gr.Row():
                    c["lp_show"] = gr.Checkbox(label="Show evidence on the axial view for", value=False, elem_id="ml-lp-show")
                    c["lp_evidence_label"] = gr.Dropdown(
                        label="Label", choices=[], value=None, allow_custom_value=True, elem_id="ml-lp-evidence-label"
                    )
            with gr.Column(scale=4):
                c["lp_status"] = gr.Markdown("" if installed else NO_MODEL_MESSAGE, label="status", elem_id="ml-lp-status")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=280):
                        c["lp_bar"] = gr.Plot(label="Label probabilities", elem_id="ml-lp-bar")
                    with gr.Column(scale=1, min_width=160):
                        c["lp_model_view"] = gr.HTML(
                            view_html(None, MODEL_VIEW_TITLE, MODEL_VIEW_PLACEHOLDER), label="model input", elem_id="ml-model-view"
                        )
                c["lp_slices_plot"] = gr.Plot(label="Per-slice probabilities", visible=False, elem_id="ml-lp-slices-plot")
                with gr.Accordion("Result as JSON (ranked labels, per-slice scores, model)", open=False):
                    c["lp_result"] = gr.JSON(label="Zero-shot result", elem_id="ml-lp-result")
    c["lp_outcome"] = gr.State(None, time_to_live=4 * 3600)  # the last result, server-side (app.outcomes)
    _wire(c, allowed, heavy)
    return c


def _wire(c: dict[str, Any], allowed: set[str], heavy: str) -> None:
    c["lp_preset"].input(
        fill_preset,
        inputs=[c["lp_preset"]],
        outputs=[c["lp_labels"], c["lp_prompt_set"]],
        api_name="label_preset",
        show_progress="hidden",
    )
    c["lp_run"].click(
        make_label_scan(allowed),
        inputs=[
            c["state"],
            c["series"],
            c["volume"],
            c["lp_model"],
            c["lp_prompt_set"],
            c["lp_labels"],
            c["lp_mode"],
            c["lp_aggregation"],
            c["lp_planes"],
            c["lp_slices"],
        ],
        outputs=[c["lp_bar"], c["lp_slices_plot"], c["lp_result"], c["lp_evidence_label"], c["lp_status"], c["lp_outcome"]],
        api_name="label_scan",
        concurrency_limit=1,
        concurrency_id=heavy,
    )
    evidence_inputs = [
        c["state"],
        c["series"],
        c["volume"],
        c["axial_slider"],
        c["center"],
        c["width"],
        c["mip"],
        c["mip_mm"],
        c["lp_model"],
        c["lp_prompt_set"],
        c["lp_evidence_label"],
        c["lp_show"],
    ]
    kwargs = dict(outputs=[c["axial_view"]], concurrency_limit=1, concurrency_id=heavy, show_progress="minimal")
    c["lp_show"].input(make_show_evidence(allowed, "show_evidence"), inputs=evidence_inputs, api_name="show_evidence", **kwargs)
    c["lp_evidence_label"].input(
        make_show_evidence(allowed, "set_evidence_label"), inputs=evidence_inputs, api_name="set_evidence_label", **kwargs
    )
    c["axial_slider"].release(
        make_evidence_on_slice(allowed), inputs=evidence_inputs, api_name="evidence_slice", trigger_mode="always_last", **kwargs
    )


def default_model_from_env() -> str | None:
    """The model source named by MEDLENS_MODEL, if any (what app.py passes to build_demo)."""
    return settings.MODEL.get()
