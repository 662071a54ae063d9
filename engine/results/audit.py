"""Audit hook for exports and pushes of results (a shim until the audit log lands).

The `auth` branch adds engine/audit.py with a `record(...)` function (an
append-only audit log without PHI). Until it is merged this shim records
nothing. To switch over, replace the body of `record` below by a call to
`engine.audit.record` with these fields (they hold no PHI: an action name,
the destination's URL or "files", the object kinds, the scan's content hash).
"""

from __future__ import annotations

from typing import Any


def record(action: str, **fields: Any) -> None:
    """Record an export ("results.export") or a push ("results.push") of results."""
    # AUDIT HOOK (lead: switch to `from engine.audit import record as _record; _record(action, **fields)` once `auth` is merged)
    del action, fields
