"""Compare a regenerated benchmark record with the committed one: every number equal, exactly.

    .venv/bin/python benchmarks/compare_records.py benchmarks/results/qlora_memory_float_base.json \\
        benchmarks/results/regenerated/qlora_memory_float_base.json

The OLDER record comes first. Its row keys (dict keys and the values of ``row``, ``variant``, ``key`` and
``baseline``) are mapped to today's through :data:`istune.planning.rows.ALIASES` (and ``--rename OLD=NEW``,
for keys that no alias covers). Ignored, and named in the output: the metadata fields in :data:`IGNORED`,
and fields the older record does not have. Everything else is compared exactly (numbers, strings, lists,
the keys present). Prints a table of what was compared; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from istune.planning.rows import ALIASES

IGNORED = ("command", "date", "commit", "seconds", "machine")
KEY_FIELDS = ("row", "variant", "key", "baseline")


def compare(old: Any, new: Any, renames: dict[str, str] | None = None) -> dict[str, Any]:
    """Walk ``old`` and ``new`` together; return counts of what was compared, the differences and what was ignored.

    Returns:
        dict with ``compared`` (Counter: numbers, strings, other leaves), ``differences`` (``path: old != new``),
        ``ignored`` (Counter of ignored field names) and ``absent_in_old`` (fields only ``new`` has).
    """
    names = {**ALIASES, **(renames or {})}
    result = {"compared": Counter(), "differences": [], "ignored": Counter(), "absent_in_old": Counter()}

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            a = {names.get(k, k): names.get(v, v) if k in KEY_FIELDS and isinstance(v, str) else v
                 for k, v in a.items()}
            for key in b.keys() - a.keys():
                result["absent_in_old"][key] += 1
            for key, value in a.items():
                if key in IGNORED:
                    result["ignored"][key] += 1
                elif key not in b:
                    result["differences"].append(f"{path}/{key}: in the older record only")
                else:
                    walk(value, b[key], f"{path}/{key}")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                result["differences"].append(f"{path}: {len(a)} items != {len(b)} items")
            for index, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{index}]")
        else:
            number = isinstance(a, (int, float)) and not isinstance(a, bool)
            result["compared"]["numbers" if number else "strings" if isinstance(a, str) else "other values"] += 1
            if a != b or type(a) is not type(b) and number:
                result["differences"].append(f"{path}: {a!r} != {b!r}")

    walk(old, new, "")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("older", type=Path, help="the committed record (JSON)")
    parser.add_argument("newer", type=Path, help="the regenerated record (JSON)")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="map a row key of the older record that no alias covers (repeatable)")
    args = parser.parse_args(argv)
    renames = dict(item.split("=", 1) for item in args.rename)
    result = compare(json.loads(args.older.read_text()), json.loads(args.newer.read_text()), renames)
    print(f"{args.older} vs {args.newer}\n\n| what | count |\n|---|---:|")
    for kind, count in sorted(result["compared"].items()):
        print(f"| compared exactly: {kind} | {count} |")
    for name, count in sorted(result["ignored"].items()):
        print(f"| ignored (metadata): `{name}` | {count} |")
    for name, count in sorted(result["absent_in_old"].items()):
        print(f"| ignored (absent in the older record): `{name}` | {count} |")
    print(f"| differences | {len(result['differences'])} |")
    for line in result["differences"]:
        print(f"DIFFERENT {line}")
    print("\nequal" if not result["differences"] else "\nNOT equal")
    return 1 if result["differences"] else 0


if __name__ == "__main__":
    sys.exit(main())
