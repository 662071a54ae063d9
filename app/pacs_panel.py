"""The "PACS" tab: connection status, search, the studies and series the PACS returns, open in viewer, send results back.

Design decisions
- UI only: handlers turn widget values into engine.pacs / engine.results
  calls. The server and credentials are the app's MEDLENS_PACS_* settings
  (never typed in the browser); the status line names the server and how
  the app authenticates, never a secret. Without MEDLENS_PACS_URL the tab
  says what to set and the rest of the app works as before.
- Search filters are exact IDs, dates and modality (engine.pacs.query):
  what the PACS returns to the configured user is shown in the table
  (patient names and IDs included) and kept nowhere but this user's page;
  the series' `dicomweb:` paths stay server-side in a gr.State, so "open in
  viewer" picks a row by its number and no browser string becomes a path.
- Opening a series reuses the Scan tab's path (handlers.show_series with a
  new ScanSession, then the Scan tab is selected), as the Library tab does.
  The scan is read in memory and de-identified like an upload; its
  identified context (engine.pacs.origin) stays on the Scan object in this
  user's gr.State, used only by "send results to PACS".
- "Send results to PACS" sends the last label result and answer about the
  scan shown, as the engine computed them (app.outcomes: server-side state,
  not the JSON panels a browser could edit), with the top label's evidence
  (recomputed on the sampled slices) and the answer's attention as SEG +
  overlay, into that scan's own study on the PACS it came from. The status
  says what was stored and where.
- PACS results carry real patient names, so every PACS event needs a
  signed-in user (app.access.acting with library=True: never anonymous
  visitors, even where MEDLENS_ALLOW_ANONYMOUS lets them label); searches and
  opens are audited, and pushes by engine.results.audit as that user.
- Search shares a small "pacs" pool; opening and sending read or compute
  whole series and share the Scan tab's HEAVY id (one at a time on 2 cores).
"""

from __future__ import annotations

import html
from typing import Any, Callable

import gradio as gr

from app import handlers
from app.access import acting

ANY = "any"
MODALITIES = [ANY, "CT", "MR", "CR", "DX", "MG", "US", "XA", "NM", "PT", "OT"]
COLUMNS = ["Date", "Patient ID", "Patient name", "Accession", "Modality", "Series", "Description", "Images"]
NOT_CONFIGURED = (
    "**No PACS configured.** Start the app with `MEDLENS_PACS_URL` (the DICOMweb root, e.g. "
    "`https://pacs.example.org/dicom-web`) and `MEDLENS_PACS_USER` / `MEDLENS_PACS_PASSWORD` or `MEDLENS_PACS_TOKEN` "
    "in its environment. See the README, *Pointing MedLens at a PACS*."
)


# --------------------------------------------------------------------------- handlers
@handlers.guarded(title="PACS")
@acting(None, library=True)
def pacs_status() -> str:
    """Whether the configured PACS answers and accepts the app's credentials."""
    from engine.pacs import PacsClient, configured

    if not configured():
        return NOT_CONFIGURED
    with PacsClient() as pacs:
        pacs.check()
        return f"Connected to the PACS at `{html.escape(pacs.identity)}` ({html.escape(pacs.config.auth_kind)})."


def _rows(studies) -> tuple[list[list[Any]], list[str], list[tuple[str, int]]]:
    table, paths, choices = [], [], []
    for study in studies:
        for row in study.series:
            if not row.is_image:
                continue
            number = "?" if row.series_number is None else str(row.series_number)
            table.append(
                [study.date, study.patient_id, study.patient_name, study.accession, row.modality, number, row.description, row.n_instances]
            )
            choices.append(
                (f"{study.date} · {study.patient_id or '-'} · {row.modality} series {number} {row.description}".strip(), len(paths))
            )
            paths.append(row.path)
    return table, paths, choices


@handlers.guarded(title="Cannot search the PACS")
@acting("pacs_search", library=True)
def pacs_search(patient_id, accession, date, modality):
    """Studies and their image series matching the filters (exact IDs, a date or range, a modality)."""
    from engine.pacs import PacsClient, configured, make_filter

    if not configured():
        raise gr.Error(NOT_CONFIGURED.replace("**", "").replace("`", ""), print_exception=False)
    query = make_filter(patient_id, accession, date, None if modality in (None, "", ANY) else modality)
    with PacsClient() as pacs:
        studies = pacs.search(query, limit=50)
    table, paths, choices = _rows(studies)
    status = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}, {len(paths)} image series." if studies else "No study matches."
    return table, paths, gr.update(choices=choices, value=0 if choices else None), status


def pacs_select_row(paths, evt: gr.SelectData):
    """A table row was clicked: pick its series for "open in viewer"."""
    index = getattr(evt, "index", None)
    row = index[0] if isinstance(index, (list, tuple)) and index else index
    if row is None or not paths or not 0 <= int(row) < len(paths):
        return gr.update()
    return gr.update(value=int(row))


@handlers.guarded(title="Cannot open this series")
@acting("load", library=True)
def pacs_open(paths, pick) -> dict[str, Any]:
    """Retrieve the picked series and show it in the Scan tab."""
    from engine.io import load

    if not paths:
        raise gr.Error("Search the PACS first, then pick a series.", print_exception=False)
    try:
        index = int(pick)
    except (TypeError, ValueError):
        raise gr.Error("Pick a series from the list (or click a row of the table).", print_exception=False) from None
    if not 0 <= index < len(paths):
        raise gr.Error("Pick a series from the list (or click a row of the table).", print_exception=False)
    result = load([paths[index]])  # a path from this user's own search, kept server-side
    session = handlers.ScanSession(scans=list(result.scans), skipped=result.messages())
    out = handlers.show_series(session, 0, toasts=True)
    out["tabs"] = gr.Tabs(selected="scan")
    out["pacs_status"] = f"Opened {len(result.scans)} scan(s) from the PACS in the Scan tab."
    return out


def make_send(allowed_models: set[str]) -> Callable:
    @handlers.guarded(title="Cannot send results to the PACS")
    @acting(None, library=True)  # the push itself is recorded (engine.results.audit) as this user
    def pacs_send(session, series, label_outcome, ask_outcome, ask_evidence) -> str:
        """Store the last label result and answer about the scan shown into its own study on its PACS."""
        from engine.pacs import PacsClient
        from engine.results import push_scan

        scan = handlers._scan(session, series)
        if scan is None or scan.origin is None:
            raise gr.Error(
                "Open a series from the PACS first (PACS tab): results go back only into the study they are about.", print_exception=False
            )
        record, heats = _record(scan, label_outcome, ask_outcome, ask_evidence, allowed_models)
        with PacsClient() as pacs:
            report, outputs = push_scan(pacs, scan, record, heats)
        kinds = ", ".join(outputs.kinds())
        lines = [
            f"Stored {kinds} ({len(report.stored)} objects) into the study this series came from, on "
            f"`{html.escape(report.server)}`. Their series descriptions say *research use, not for diagnosis*."
        ]
        lines += [f"- {html.escape(note)}" for note in outputs.notes]
        return "\n\n".join(lines)

    return pacs_send


def _record(scan, label_outcome, ask_outcome, ask_evidence, allowed_models: set[str]):
    """The ResultRecord and evidence of what this user computed about `scan` (outcomes of other scans are ignored)."""
    from app.ask_panel import is_qformer
    from engine.results import AnswerBlock, label_heat, record_for, view_heat

    labels = label_outcome if label_outcome is not None and label_outcome.scan_hash == scan.content_hash else None
    asked = ask_outcome if ask_outcome is not None and ask_outcome.scan_hash == scan.content_hash else None
    if labels is None and asked is None:
        raise gr.Error("Label this scan or ask a question about it first; then send the results.", print_exception=False)
    answers = [AnswerBlock.from_answer(asked.answer, asked.model, asked.revision)] if asked else []
    record = record_for(scan, labels=labels.data if labels else None, answers=answers)
    heats = []
    if labels is not None and not is_qformer(labels.model) and labels.model in allowed_models:
        per_slice = labels.data.get("per_slice") or []
        planes = [s["plane"] for s in per_slice]
        plane = "axial" if "axial" in planes or not planes else planes[0]
        prompt_set = None if labels.prompt_set in (None, "", "auto") else labels.prompt_set
        heats.append(
            label_heat(
                scan,
                record.labels.top.label,
                labels.model,
                prompt_set,
                plane=plane,
                indices=[s["index"] for s in per_slice if s["plane"] == plane] or None,
            )
        )
    if asked is not None and ask_evidence is not None and getattr(ask_evidence, "scan_hash", None) == scan.content_hash:
        heats.append(view_heat(scan, asked.answer["question"], ask_evidence))
    return record, [h for h in heats if h.planes]


# --------------------------------------------------------------------------- layout and wiring
def build_pacs_tab(scan: dict[str, Any], tabs: gr.Tabs | None = None, model: str | None = None) -> dict[str, Any]:
    """Create the "PACS" tab in the current gr.Tabs; `scan` holds the Scan tab's components."""
    from app.labels_panel import model_choices
    from app.scan_tab import HEAVY, SERIES_OUTPUTS

    choices, _value = model_choices(model)
    allowed = {v for _, v in choices}
    c: dict[str, Any] = {}
    with gr.Tab("PACS", id="pacs", elem_id="ml-pacs-tab") as c["tab"]:
        c["paths"] = gr.State([])
        c["pacs_status"] = gr.Markdown("", label="PACS status", elem_id="ml-pacs-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                c["check"] = gr.Button("Check connection", size="sm", elem_id="ml-pacs-check")
                c["patient_id"] = gr.Textbox(label="Patient ID (exact)", elem_id="ml-pacs-patient-id")
                c["accession"] = gr.Textbox(label="Accession number (exact)", elem_id="ml-pacs-accession")
                c["date"] = gr.Textbox(label="Study date", placeholder="20240105 or 20240101-20240131", elem_id="ml-pacs-date")
                c["modality"] = gr.Dropdown(label="Modality", choices=MODALITIES, value=ANY, elem_id="ml-pacs-modality")
                c["search"] = gr.Button("Search the PACS", variant="primary", elem_id="ml-pacs-search")
                c["pick"] = gr.Dropdown(label="Series", choices=[], value=None, elem_id="ml-pacs-pick")
                c["open"] = gr.Button("Open in viewer", elem_id="ml-pacs-open")
                c["send"] = gr.Button("Send results to PACS", elem_id="ml-pacs-send")
                gr.Markdown(
                    "Sends the last zero-shot labels and answer about the scan shown (with their evidence) into "
                    "its own study: a DICOM SR, SEG and overlay marked research use, not for diagnosis."
                )
            with gr.Column(scale=4):
                c["results"] = gr.Dataframe(
                    headers=COLUMNS, value=[], interactive=False, wrap=True, label="Studies and series", elem_id="ml-pacs-results"
                )
                c["send_status"] = gr.Markdown("", label="sent", elem_id="ml-pacs-send-status")
    _wire(c, scan, tabs, allowed, HEAVY, SERIES_OUTPUTS)
    return c


def _wire(c, scan, tabs, allowed, heavy, series_outputs) -> None:
    from app.library_tab import _ordered

    light = dict(concurrency_limit=2, concurrency_id="pacs")
    c["tab"].select(pacs_status, outputs=[c["pacs_status"]], api_name="pacs_status_on_open", show_progress="hidden", **light)
    c["check"].click(pacs_status, outputs=[c["pacs_status"]], api_name="pacs_status", **light)
    gr.on(
        [c["search"].click, c["patient_id"].submit, c["accession"].submit, c["date"].submit],
        pacs_search,
        inputs=[c["patient_id"], c["accession"], c["date"], c["modality"]],
        outputs=[c["results"], c["paths"], c["pick"], c["pacs_status"]],
        api_name="pacs_search",
        **light,
    )
    c["results"].select(pacs_select_row, inputs=[c["paths"]], outputs=[c["pick"]], api_name="pacs_select_row", show_progress="hidden")
    open_names = tuple(series_outputs) + (("tabs",) if tabs is not None else ()) + ("pacs_status",)
    everything = {**scan, "tabs": tabs, "pacs_status": c["pacs_status"]}
    c["open"].click(
        _ordered(pacs_open, open_names),
        inputs=[c["paths"], c["pick"]],
        outputs=[everything[n] for n in open_names],
        api_name="pacs_open",
        concurrency_limit=1,
        concurrency_id=heavy,
    )
    c["send"].click(
        make_send(allowed),
        inputs=[scan["state"], scan["series"], scan["lp_outcome"], scan["ask_record"], scan["ask_evidence"]],
        outputs=[c["send_status"]],
        api_name="pacs_send",
        concurrency_limit=1,
        concurrency_id=heavy,
    )
