"""``_filter`` (http://hl7.org/fhir/R4/search_filter.html), the common subset.

``param op value`` expressions joined by ``and`` / ``or``, negated by ``not (…)``, grouped by
parentheses. Operators: ``eq ne co sw gt lt ge le sa eb ap pr``. Each expression becomes an
ordinary search criterion (``name co "ann"`` -> ``name:contains=ann``, ``birthdate ge 2000``
-> ``birthdate=ge2000``, ``gender pr false`` -> ``gender:missing=true``), so the SQL and the
in-memory matcher need nothing new; the boolean structure is kept as a tree. Not supported:
``ew po ss sb in ni re`` and parameter paths with ``[filter]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPS = {"eq", "ne", "co", "sw", "gt", "lt", "ge", "le", "sa", "eb", "ap", "pr"}
_TOKEN = re.compile(r'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))')


@dataclass(slots=True)
class Leaf:
    """One ``param op value`` expression, as the (name, value) of an ordinary criterion."""

    name: str
    value: str


@dataclass(slots=True)
class Node:
    """``and`` / ``or`` of children, or ``not`` of one child."""

    op: str
    children: list[Leaf | Node]


class FilterError(ValueError):
    """A ``_filter`` expression the server cannot read."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FilterError(f"cannot read _filter at character {pos}")
        pos = m.end()
        if m.group(1):
            out.append(("(", "("))
        elif m.group(2):
            out.append((")", ")"))
        elif m.group(3) is not None:
            out.append(("str", re.sub(r"\\(.)", r"\1", m.group(3))))
        else:
            out.append(("word", m.group(4)))
    return out


def parse_filter(text: str, param_types: dict[str, str]) -> Leaf | Node:
    """Parse a ``_filter`` value; ``param_types`` maps parameter codes to their types."""
    tokens = _tokens(text)
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        if pos >= len(tokens):
            raise FilterError("unexpected end of _filter")
        pos += 1
        return tokens[pos - 1]

    def expression() -> Leaf | Node:
        left = term()
        while (tok := peek()) is not None and tok[0] == "word" and tok[1].lower() in ("and", "or"):
            op = take()[1].lower()
            right = term()
            if isinstance(left, Node) and left.op == op:
                left.children.append(right)
            else:
                left = Node(op, [left, right])
        return left

    def term() -> Leaf | Node:
        tok = take()
        if tok == ("(", "("):
            inner = expression()
            if take() != (")", ")"):
                raise FilterError("missing ')' in _filter")
            return inner
        if tok[0] == "word" and tok[1].lower() == "not":
            if take() != ("(", "("):
                raise FilterError("'not' must be followed by '('")
            inner = expression()
            if take() != (")", ")"):
                raise FilterError("missing ')' in _filter")
            return Node("not", [inner])
        if tok[0] != "word":
            raise FilterError(f"expected a parameter name at token {pos}")
        name = tok[1]
        op = take()[1].lower()
        if op not in OPS:
            raise FilterError(f"the operator at token {pos} is not supported in _filter")
        value = take()[1]
        return _leaf(name, op, value, param_types.get(name))

    tree = expression()
    if pos != len(tokens):
        raise FilterError(f"unexpected token {pos + 1} in _filter")
    return tree


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("$", "\\$")


def _leaf(name: str, op: str, value: str, ptype: str | None) -> Leaf | Node:
    if ptype is None and name not in ("_id", "_lastUpdated"):
        raise FilterError(f"unknown parameter '{name}' in _filter")
    if op == "pr":
        return Leaf(f"{name}:missing", "false" if value.lower() == "true" else "true")
    if ptype in ("date", "number", "quantity") or name == "_lastUpdated":
        return Leaf(name, op + _escape(value))
    if op in ("gt", "lt", "ge", "le", "sa", "eb", "ap"):
        raise FilterError(f"operator '{op}' needs a date, number or quantity parameter")
    if ptype == "string":
        modifier = {"eq": ":exact", "ne": ":exact", "co": ":contains", "sw": ""}[op]
        leaf = Leaf(name + modifier, _escape(value))
        return Node("not", [leaf]) if op == "ne" else leaf
    if op in ("co", "sw"):
        raise FilterError(f"operator '{op}' needs a string parameter")
    leaf = Leaf(name, _escape(value))
    return Node("not", [leaf]) if op == "ne" else leaf
