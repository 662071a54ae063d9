"""Audit lines for exports and pushes of results (engine.audit; no PHI).

An export or push is recorded as the acting user (engine.audit.current_user:
the app's signed-in user, `local` for the CLI) with the scan's de-identified
content hash and counts; never a path, a URL or a patient attribute.
"""

from __future__ import annotations

from typing import Any, Sequence

from engine import audit

ACTIONS = {"results.export": "export", "results.push": "push"}


def record(action: str, *, objects: Sequence[str], content_hash: str | None, destination: Any = None, model: Any = None) -> None:
    """Record an export ("results.export") or a push ("results.push") of one scan's results."""
    del destination  # a folder or a server URL: not for the audit log (it may name a patient or a host)
    kinds = {str(k).lower().replace(" ", "_") for k in objects}
    audit.record(
        ACTIONS[action],
        user=audit.current_user(),
        model=model,
        scans=[content_hash] if content_hash else [],
        detail={"objects": len(objects), **{f"has_{k}": True for k in sorted(kinds) if k.replace("_", "").isalnum()}},
    )
