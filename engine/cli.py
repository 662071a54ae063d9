"""`medlens` command line.

Conventions: results on stdout (JSON Lines with --json), problems on stderr
as one line each; exit status 0 when something useful was produced, 2 on bad
input (nothing loadable, bad arguments). Never a stack trace: unexpected
errors become a one-line message as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from engine.errors import MedLensError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and a single line (its default is a usage block)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _print_skipped(result) -> None:
    for message in result.messages():
        print(f"medlens: skipped {message}", file=sys.stderr)


def cmd_info(args) -> int:
    from engine.io import load

    result = load(args.paths)
    _print_skipped(result)
    for i, scan in enumerate(result.scans):
        summary = scan.summary()
        if args.json:
            print(json.dumps({"series": i, "n_series": len(result.scans), **summary}, default=str))
        else:
            print(f"[{i}] {scan.label}")
            print(f"    modality     {summary['modality']}")
            print(f"    shape        {' x '.join(map(str, summary['shape']))}")
            print(f"    spacing (mm) {' x '.join(f'{s:g}' for s in summary['spacing_mm'])}")
            print(f"    orientation  {summary['orientation']}")
            print(f"    reader       {summary['reader']}" + (f" ({summary['transfer_syntax']})" if summary["transfer_syntax"] else ""))
            for w in summary["warnings"]:
                print(f"    warning      {w}")
    if not args.json:
        print(f"{len(result.scans)} series found" + (f", {len(result.skipped)} file(s) skipped" if result.skipped else ""))
    return 0


def cmd_convert(args) -> int:
    from engine.export import save_nifti
    from engine.io import load_one

    scan, result = load_one(args.paths, series=args.series)
    _print_skipped(result)
    if args.volume is not None:
        scan = scan.volume(args.volume)
    out = save_nifti(scan, args.output)
    print(f"wrote {out} ({' x '.join(map(str, scan.voxels.shape[::-1]))}, RAS+)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medlens", description="MedLens: medical scans in, shown right.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="describe the scans found in files, folders or zips")
    p.add_argument("paths", nargs="+", help="DICOM files/folders/zips, NIfTI, PNG/JPEG/TIFF")
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per series")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write a scan as NIfTI in RAS+")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--output", required=True, help="OUT.nii or OUT.nii.gz")
    p.add_argument("--series", type=int, default=None, help="which series (0-based, as listed by info) when several are found")
    p.add_argument("--volume", type=int, default=None, help="write one volume of a 4D scan (0-based)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except _UsageError as exc:
        print(f"medlens: {exc} (see medlens --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MedLensError as exc:
        print(f"medlens: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("medlens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a stack trace for a user
        print(f"medlens: unexpected error: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())[:1000]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
