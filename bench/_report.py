"""Markdown pieces the bench scripts' result files share: the header block, sections, tables, package versions.

Each script states its own measurements; these helpers only keep the
common layout (and its formatting) in one place."""

from __future__ import annotations

import datetime as dt
import platform
from typing import Iterable, Mapping, Sequence


def package_versions(*packages: str) -> dict[str, str]:
    """python and each installed package's version ("absent" when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def header(title: str, command: str, cpu: str, versions: Mapping[str, str] | str) -> list[str]:
    """The opening of a result file: title, local date, the command that made it, the CPU, the versions."""
    if not isinstance(versions, str):
        versions = ", ".join(f"{k} {v}" for k, v in versions.items())
    return [
        f"# {title}",
        "",
        f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Command: `{command}`",
        f"- CPU: {cpu}",
        f"- Versions: {versions}",
    ]


def section(heading: str, *body: str) -> list[str]:
    """A blank line, a heading (or lead-in sentence), a blank line, then the body lines."""
    return ["", heading, "", *body]


def bullets(heading: str, items: Iterable[str]) -> list[str]:
    """`section` whose body is one "- " bullet per item."""
    return section(heading, *(f"- {item}" for item in items))


def table(header: str, align: str, rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table: the header ("a | b | c"), the alignment row (align: a letter per column, "l" left,
    "r" right), then a line per row of cells."""
    if len(align) != header.count("|") + 1:
        raise ValueError(f"{len(align)} alignments for the {header.count('|') + 1} columns of {header!r}")
    rule = "".join("|---:" if a == "r" else "|---" for a in align) + "|"
    return [f"| {header} |", rule, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]
