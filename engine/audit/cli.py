"""`medlens audit`: read the audit log, filtered by user, action, time or scan."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.errors import MedLensError


def cmd_audit(args) -> int:
    from engine.audit.log import log_path, parse_since, read

    path = Path(args.log).expanduser() if args.log else log_path()
    if path is None:
        raise MedLensError("the audit log is off (MEDLENS_AUDIT_LOG=off); give --log PATH to read a file")
    if not path.exists():
        raise MedLensError(f"no audit log at {path} yet (nothing recorded, or MEDLENS_AUDIT_LOG points elsewhere)")
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise MedLensError(f"--since: {exc}") from None
    records, bad = read(path, user=args.user, action=args.action, since=since, scan=args.scan)
    if bad:
        print(f"medlens: {bad} unreadable line(s) in {path} skipped", file=sys.stderr)
    for rec in records:
        if args.json:
            print(rec.to_json())
            continue
        model = f"{rec.model}@{rec.revision}" if rec.model and rec.revision else (rec.model or "-")
        scans = ",".join(h[:12] for h in rec.scans) or "-"
        print(f"{rec.time}  {rec.user:<16} {rec.action:<8} {rec.outcome:<20} {model}  {scans}")
    if not args.json:
        print(f"{len(records)} record(s) in {path}")
    return 0


def register(sub) -> None:
    """Add `medlens audit` to the CLI's subparsers."""
    p = sub.add_parser("audit", help="read the audit log (who ran which model on which de-identified scan)")
    p.add_argument("--user", default=None, help="only this login (local: the CLI and the single local user)")
    p.add_argument(
        "--action", default=None, help="only this action (load, label, ask, search, open, add, tag, teach, share, index, login, ...)"
    )
    p.add_argument("--since", default=None, metavar="DATE", help="only records from this date or ISO time on (UTC), e.g. 2026-12-01")
    p.add_argument("--scan", default=None, metavar="HASH", help="only records about this scan (content hash or its prefix)")
    p.add_argument(
        "--log", default=None, metavar="PATH", help="the log file (default: $MEDLENS_AUDIT_LOG, else ~/.local/share/medlens/audit.jsonl)"
    )
    p.add_argument("--json", action="store_true", help="the matching records as JSON Lines, as stored")
    p.set_defaults(func=cmd_audit)
