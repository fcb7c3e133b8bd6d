"""The list filters Vertex AI's List* RPCs accept, as far as clients of this project use them:
conjunctions (``AND``) of ``field=value`` / ``field!=value`` / ``labels.key:*`` comparisons on
``display_name``, ``state`` and ``labels.<key>``; values quoted or bare. Anything else is refused
with INVALID_ARGUMENT rather than silently ignored.
"""

from __future__ import annotations

import re

from localcloud.rules import invalid

_TERM = re.compile(r'^\s*(?P<field>[A-Za-z_][A-Za-z0-9_.\-]*)\s*(?P<op>!=|=|:)\s*(?P<value>"[^"]*"|[^\s"]+)\s*$')


def parse(text: str) -> list[tuple[str, str, str]]:
    if not text or not text.strip():
        return []
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        m = _TERM.match(part)
        if not m:
            raise invalid(f"Unsupported filter '{text}': the local Vertex AI server accepts field=value, "
                          "field!=value and labels.key:* terms joined by AND")
        value = m["value"][1:-1] if m["value"].startswith('"') else m["value"]
        terms.append((m["field"], m["op"], value))
    return terms


def matches(terms: list[tuple[str, str, str]], fields: dict[str, str], labels: dict[str, str]) -> bool:
    for field, op, value in terms:
        if field.startswith("labels."):
            actual = labels.get(field[len("labels."):])
        elif field in fields:
            actual = fields[field]
        else:
            raise invalid(f"Unsupported filter field '{field}' (supported: {sorted(fields)} and labels.<key>)")
        if op == ":":
            ok = actual is not None and (value == "*" or value in actual)
        elif op == "=":
            ok = actual == value
        else:
            ok = actual != value
        if not ok:
            return False
    return True
