"""`medlens pacs ...`: search the PACS and check the connection.

    medlens pacs status
    medlens pacs search [--patient-id ID] [--accession A] [--date D | FROM-TO] [--modality M]
                        [--study UID] [--series UID] [--limit N] [--json]

With --json: JSON Lines, one {"level": "study", ...} object per study followed
by one {"level": "series", "path": "dicomweb:STUDY/SERIES", ...} object per
series (what `medlens info/label/ask/index/convert` accept as a PATH).
Connection and credentials come from MEDLENS_PACS_* only (engine.pacs.config).
"""

from __future__ import annotations

import json
import sys

from engine.errors import MedLensError


def _add_filters(p) -> None:
    p.add_argument("--patient-id", default=None, help="exact patient ID")
    p.add_argument("--accession", default=None, help="exact accession number")
    p.add_argument("--date", default=None, help="study date YYYYMMDD (or YYYY-MM-DD), or a range FROM-TO, e.g. 20240101-20240131")
    p.add_argument("--modality", default=None, help="modality, e.g. CT, MR, CR, DX, US")
    p.add_argument("--study", default=None, metavar="UID", help="StudyInstanceUID")
    p.add_argument("--series", default=None, metavar="UID", help="SeriesInstanceUID")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pacs",
        help="search the PACS (DICOMweb) named by MEDLENS_PACS_URL; its series open as dicomweb:STUDY/SERIES paths",
        description="Search the PACS and check the connection. The server and credentials come from MEDLENS_PACS_URL, "
        "MEDLENS_PACS_USER/MEDLENS_PACS_PASSWORD or MEDLENS_PACS_TOKEN (never from the command line).",
    )
    sub = p.add_subparsers(dest="pacs_command", required=True, parser_class=type(p))
    s = sub.add_parser("search", help="list studies and their series (names are filtered out: search by IDs, dates, modality, UIDs)")
    _add_filters(s)
    s.add_argument("--limit", type=int, default=50, help="at most this many studies (default 50)")
    s.add_argument(
        "--json", action="store_true", help='JSON Lines: {"level": "study", ...} then {"level": "series", "path": ...} per series'
    )
    s.set_defaults(func=cmd_pacs_search)
    c = sub.add_parser("status", help="check that the PACS answers and accepts the credentials")
    c.add_argument("--json", action="store_true", help='one JSON object {"server", "auth", "ok"}')
    c.set_defaults(func=cmd_pacs_status)


def cmd_pacs_search(args) -> int:
    from engine.pacs.client import PacsClient
    from engine.pacs.query import make_filter

    if args.limit < 1:
        raise MedLensError(f"--limit must be at least 1 (got {args.limit})")
    query = make_filter(args.patient_id, args.accession, args.date, args.modality, args.study, args.series)
    with PacsClient() as pacs:
        studies = pacs.search(query, limit=args.limit)
    for study in studies:
        if args.json:
            print(json.dumps(study.to_dict(), ensure_ascii=False))
            for row in study.series:
                print(json.dumps(row.to_dict(), ensure_ascii=False))
            continue
        modalities = "/".join(study.modalities) or "?"
        print(
            f"{study.path}  {study.date or '????????'}  {study.patient_id or '-'}  {study.patient_name or '-'}  "
            f"{study.accession or '-'}  {modalities}  {study.description}".rstrip()
        )
        for row in study.series:
            count = f"{row.n_instances} instances" if row.n_instances is not None else "? instances"
            kind = "" if row.is_image else "  (not an image)"
            print(
                f"    {row.path}  {row.modality}  series {row.series_number if row.series_number is not None else '?'}  "
                f"{count}  {row.description}{kind}".rstrip()
            )
    if not studies:
        print("medlens: no study matches", file=sys.stderr)
    elif not args.json:
        print(
            f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} found" + (" (limit reached)" if len(studies) >= args.limit else "")
        )
    return 0


def cmd_pacs_status(args) -> int:
    from engine.pacs.client import PacsClient

    with PacsClient() as pacs:
        pacs.check()
        server, auth = pacs.identity, pacs.config.auth_kind
    if args.json:
        print(json.dumps({"server": server, "auth": auth, "ok": True}))
    else:
        print(f"PACS at {server} answers ({auth})")
    return 0
