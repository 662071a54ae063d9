"""Training configuration: one dataclass per trainer, one small dataclass-to-argparse helper.

Design decisions
- A trainer's settings are a dataclass (`ClipConfig`, `SSLConfig`,
  `QFormerConfig` ...): typed fields with their defaults and one line of
  help each (`arg(...)` in the field's metadata). `parse(Config, argv)`
  builds the argparse parser from the fields, so a flag, its type, default
  and help are written once; `--some-field` is the field `some_field`.
- The parsed dataclass is saved verbatim (`asdict`) in the run's summary
  and the exported checkpoint's config, so a checkpoint says exactly how it
  was trained and `parse(Config, to_argv(saved))` rebuilds the same run.
- Bad arguments raise `UsageError` (a MedLensError) with argparse's
  message instead of argparse's SystemExit, so the rebuild pipeline and
  tests can report them like any other user error; `main()` functions turn
  it into exit status 2 (`run_main`).
- Types understood: bool (False default: `--flag`; True or None
  default: `--flag/--no-flag`), int, float, str, Path, `X | None`, `list[X]`
  (`nargs="*"`). Anything else is a programming error, raised at parse time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from engine.errors import MedLensError

C = TypeVar("C")


class UsageError(MedLensError):
    """A training command was called with arguments it cannot use; the message says which."""


def arg(help: str | None, *, choices: Sequence[Any] | None = None, required: bool = False, flag: str | None = None) -> dict[str, Any]:
    """Field metadata for `parse`: `field(default=..., metadata=arg("what it does"))`."""
    return {"help": help, "choices": choices, "required": required, "flag": flag}


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _add(parser: argparse.ArgumentParser, field: dataclasses.Field, tp: Any) -> None:
    meta = field.metadata
    name = _flag(field)
    default = None if field.default is dataclasses.MISSING else field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = field.default_factory()  # type: ignore[misc]
    kwargs: dict[str, Any] = {"dest": field.name, "help": meta.get("help", ""), "default": default}
    if meta.get("required"):
        kwargs["required"] = True
    if meta.get("choices") is not None:
        kwargs["choices"] = list(meta["choices"])
    base, optional = _unwrap_optional(tp)
    if base is bool:  # True or None (undecided) defaults need the --no- form too
        kwargs["action"] = argparse.BooleanOptionalAction if default or optional else "store_true"
    elif typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        kwargs.update(nargs="*", type=item)
    elif base in (int, float, str, Path):
        kwargs["type"] = base
    else:
        raise TypeError(f"{field.name}: type {tp!r} is not supported by training.config")
    parser.add_argument(name, **kwargs)


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser whose arguments are the dataclass's fields."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata:
            continue  # not a command-line setting (no arg(...) metadata)
        _add(parser, field, hints[field.name])
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def parse(cls: type[C], argv: Sequence[str] | None = None, *, prog: str | None = None) -> C:
    """The dataclass `cls` filled from command-line arguments (UsageError on bad ones)."""
    parser = build_parser(cls, prog or f"python -m {cls.__module__}")
    parser.__class__ = _Parser
    namespace = parser.parse_args(list(argv) if argv is not None else None)
    return cls(**vars(namespace))


def to_dict(config: Any) -> dict[str, Any]:
    """The config as JSON-ready data (paths as strings), to save verbatim beside what it produced."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def to_argv(cls: type, values: dict[str, Any]) -> list[str]:
    """Command-line arguments that `parse(cls, ...)` turns back into these values (defaults omitted)."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for field in dataclasses.fields(cls):
        if field.name not in values or "help" not in field.metadata:
            continue
        value, default = values[field.name], field.default
        if value == default:
            continue
        base, _ = _unwrap_optional(hints[field.name])
        flag = _flag(field)
        if base is bool:
            out.append(flag if value else "--no-" + flag[2:])
        elif typing.get_origin(base) is list:
            out += [flag, *map(str, value or [])]
        elif value is not None:
            out += [flag, str(value)]
    return out


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a trainer's main; a UsageError is one line on stderr and exit status 2 (never a traceback)."""
    try:
        return main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def print_report(make: Callable[[], tuple[Any, str]]) -> int:
    """Print the Markdown of a report run (`make` returns (results, markdown)); exit 0, or run_main's UsageError line and 2."""

    def show(_argv: Sequence[str] | None) -> int:
        print(make()[1])
        return 0

    return run_main(show)


# --------------------------------------------------------------------------- shared small pieces
def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON Lines atomically (a temp file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- the rebuild commands' arguments
@dataclasses.dataclass
class RebuildConfig:
    """Rebuild a shipped model from ../shared/data, end to end (the arguments every training.rebuild* command takes)."""

    data_root: str = dataclasses.field(default="../shared/data", metadata=arg("folder holding the sources (the shared data)"))
    out: str = dataclasses.field(default="runs/rebuild", metadata=arg("work folder (manifest, caches, checkpoints, evaluation)"))
    export: str = dataclasses.field(default="", metadata=arg("where the finished model folder goes ('' to skip)"))
    seed: int = dataclasses.field(default=0, metadata=arg("random seed of the whole run"))
    recipe: str = dataclasses.field(default="", metadata=arg("the recipe JSON (trainer arguments); default: the shipped model's"))
    threads: int = dataclasses.field(default=0, metadata=arg("torch threads (0: torch's choice)"))
