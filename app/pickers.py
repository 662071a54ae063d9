"""The model pickers' choices, shared by the Labels and Ask panels."""

from __future__ import annotations

from typing import Iterable


def model_picker_choices(current: str | None, offered: Iterable[tuple[str, str]], default: str) -> tuple[list[tuple[str, str]], str | None]:
    """(label, source) choices and the initial value: this app's model first (and chosen), then each
    offered (source, note) not listed yet; without an app model the default is chosen when offered."""
    choices: list[tuple[str, str]] = []
    value = None
    if current:
        choices.append((f"{current} (this app's model)", current))
        value = current
    for source, note in offered:
        if any(source == v for _, v in choices):
            continue
        choices.append((f"{source} ({note})", source))
        if value is None and source == default:
            value = source
    return choices, value
