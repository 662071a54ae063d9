""" "What the model sees": the exact input a model received for the slice shown, beside its answer.

UI only: the pixels come from engine.preview, which reproduces a model's
input with the model's own calls (model image, then its resize; a 3D
Q-Former's prepared volume). Shown with nearest-neighbour scaling
(`image-rendering: pixelated`), so 96 px look like 96 px.
"""

from __future__ import annotations


from app import handlers
from app.ask_panel import QFORMER_PREFIX, is_qformer
from app.display import view_html

TITLE = "What the model sees"
PLACEHOLDER = "label the scan to see the model's input for the slice shown"


def make_model_view(allowed_models: set[str]):
    @handlers.guarded(title="Cannot show the model's input")
    def model_view(session, series, model, axial_index) -> str:
        """The chosen model's input for the axial slice shown (or the image), with its resolution, crop and window."""
        from engine import preview

        scan = handlers._scan(session, series)
        if scan is None or not model or model not in allowed_models:
            return view_html(None, TITLE, PLACEHOLDER)
        index = None if scan.is_2d or axial_index is None else int(axial_index)
        if is_qformer(model):
            from engine.ask.api import resolve_ask_model

            ask = resolve_ask_model(model[len(QFORMER_PREFIX) :])
            shown = preview.volume_input(scan, ask, index) if not scan.is_2d else preview.clip_input(scan, ask)
        else:
            from engine.zeroshot import resolve_model

            shown = preview.clip_input(scan, resolve_model(model), "axial", index)
        return view_html(shown.pixels, TITLE, shown.caption())

    return model_view
