"""Command-line option checks shared by the recipe, benchmark and analysis commands; errors name the option and
the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

_TYPE_NAMES = {int: "an int", float: "a float", str: "a string"}


def parse_list(option: str, text: str, kind: type = str, allowed: Iterable[str] | None = None) -> list:
    """``"1,2"`` -> ``[kind("1"), kind("2")]`` for ``--option``; refuses an empty list, unknown or bad items and
    repeats."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    choices = list(allowed) if allowed is not None else None
    if not items:
        example = ",".join(choices[:2]) if choices else "1,2"
        raise ValueError(f"--{option}={text!r} is empty; give comma-separated values, e.g. --{option} {example}.")
    if choices is not None:
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise ValueError(f"--{option}={text!r}: unknown {', '.join(map(repr, unknown))}; "
                             f"use a comma-separated list of {', '.join(choices)}.")
    values = []
    for item in items:
        try:
            values.append(kind(item))
        except ValueError:
            raise ValueError(f"--{option}={text!r}: {item!r} is not {_TYPE_NAMES.get(kind, kind.__name__)}; "
                             f"use a comma-separated list of {kind.__name__}s, e.g. 1,2.") from None
    if len(set(values)) != len(values):
        raise ValueError(f"--{option}={text!r} repeats a value; give each value once.")
    return values


def require_at_least_one(options: Any, names: Iterable[str]) -> None:
    """Raise ValueError naming the first of ``options.<name>`` that is below 1."""
    for name in names:
        if getattr(options, name) < 1:
            raise ValueError(f"--{name}={getattr(options, name)!r} must be at least 1.")


def did_you_mean(name: Any, known: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the known name closest to an unknown ``name``; '' when none is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f"did you mean {close[0]!r}? " if close else ""
