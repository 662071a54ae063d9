"""The last label result and answer of a user, kept server-side (gr.State) for "send results to PACS".

Design decision: the PACS tab sends what the engine computed, never what the
browser holds: the result JSON panels are browser state a user could edit,
so the labels and ask events also put their result into a gr.State (never
sent to the browser), bound to the content hash of the scan it is about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LabelOutcome:
    scan_hash: str
    data: dict[str, Any]  # LabelResult.to_dict() shape (CLIP) or engine.ask.api.label_volume (Q-Former)
    model: str  # the labels panel's model value (an allow-listed source, or "qformer:<source>")
    prompt_set: str | None


@dataclass(frozen=True)
class AskOutcome:
    scan_hash: str
    answer: dict[str, Any]  # Answer.to_dict() (+ "most_attended_axial_slice")
    model: str  # AskModel.name
    revision: str
