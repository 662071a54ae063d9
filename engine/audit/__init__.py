"""The audit trail of a MedLens server or CLI: who did what, with which model, on which (de-identified) scan.

    from engine import audit
    audit.record("export", user="alice", model=model, scans=[scan.content_hash], detail={"files": 3})
    with audit.recorded("label", user="local", model=model) as entry:
        ...; entry.scan(scan)                      # one JSON line when the block ends, error:<class> on an exception

Modules: log (record, recorded, read; the file's rules in its docstring),
cli (`medlens audit`).
"""

from engine.audit.log import (
    DENIED,
    OK,
    REFUSED,
    AuditRecord,
    Entry,
    acting_as,
    current_user,
    log_path,
    outcome_of,
    parse_since,
    read,
    record,
    recorded,
)

__all__ = [
    "DENIED",
    "OK",
    "REFUSED",
    "AuditRecord",
    "Entry",
    "acting_as",
    "current_user",
    "log_path",
    "outcome_of",
    "parse_since",
    "read",
    "record",
    "recorded",
]
