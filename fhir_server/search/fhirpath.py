"""A compiled evaluator for the FHIRPath subset that SearchParameter expressions use.

http://hl7.org/fhir/R4/searchparameter.html#2.37.5 (SearchParameter.expression) and
http://hl7.org/fhirpath/. Most of the 1,378 R4 expressions are unions of simple paths with an
occasional ``as Type`` / ``.as(Type)`` / ``.ofType(Type)``, ``.where(resolve() is Type)`` or
``.where(field='literal')``. Those are compiled once into a list of steps evaluated over plain
dicts while tracking each node's FHIR type (from fhirpathpy's R4 model: element paths, choice
types), which the extractors use to pick the right index rows. Anything else falls back to
``fhirpathpy`` (compiled once, with the R4 model); its results carry no type and are classified
by shape. Unit tests check that both give the same values on sample resources.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fhirpathpy import compile as fp_compile
from fhirpathpy.models import models as _fp_models

log = logging.getLogger(__name__)

_MODEL = _fp_models["r4"]
_PATH_TYPE: dict[str, str] = _MODEL["path2Type"]
_CHOICES: dict[str, list[str]] = _MODEL["choiceTypePaths"]
_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_BASES = {"Resource", "DomainResource"}

PRIMITIVES = {
    "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
    "instant", "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt",
    "uri", "url", "uuid", "xhtml",
}  # fmt: skip


def _type_name(choice: str) -> str:
    """``DateTime`` (as written in choice lists) -> ``dateTime`` for primitives."""
    lowered = choice[0].lower() + choice[1:]
    return lowered if lowered in PRIMITIVES else choice


@dataclass(slots=True)
class Node:
    """One value reached by a path, with its FHIR type (``None`` when unknown) and path."""

    value: Any
    type: str | None
    path: str


Step = Callable[[list[Node]], list[Node]]


def _child(name: str) -> Step:
    # What a child of a given parent type resolves to never changes: looked up once per type.
    resolved: dict[str, tuple[str, tuple[str, ...] | None, str | None]] = {}

    def lookup(base: str) -> tuple[str, tuple[str, ...] | None, str | None]:
        path = _resolve(base, name)
        typ = _PATH_TYPE.get(path)
        choices = _CHOICES.get(path)
        entry = (path, tuple(choices) if choices is not None else None, _STRING.get(typ, typ))
        resolved[base] = entry
        return entry

    def step(nodes: list[Node]) -> list[Node]:
        out: list[Node] = []
        for node in nodes:
            value = node.value
            if not isinstance(value, dict):
                continue
            base = node.path if node.type is None else node.type
            path, choices, typ = resolved.get(base) or lookup(base)
            if choices is not None:
                for choice in choices:
                    found = value.get(name + choice[0].upper() + choice[1:])
                    if found is not None:
                        _append(out, found, _type_name(choice), path)
                continue
            found = value.get(name)
            if found is None:
                continue
            if typ == "Resource" and isinstance(found, dict):
                _append(out, found, found.get("resourceType"), path)
            else:
                _append(out, found, typ, path)
        return out

    return step


_STRING = {"System.String": "string"}


def _resolve(base: str, name: str) -> str:
    """The model path of child ``name`` of ``base``, walking up to DomainResource / Resource."""
    path = f"{base}.{name}"
    path = _ELSEWHERE.get(path, path)
    if path in _PATH_TYPE or path in _CHOICES or "." in base:
        return path
    parent = _MODEL["type2Parent"].get(base)
    while parent is not None:
        candidate = f"{parent}.{name}"
        if candidate in _PATH_TYPE or candidate in _CHOICES:
            return candidate
        parent = _MODEL["type2Parent"].get(parent)
    return path


def _append(out: list[Node], found: Any, typ: str | None, path: str) -> None:
    if isinstance(found, list):
        out.extend(Node(item, typ, path) for item in found if item is not None)
    else:
        out.append(Node(found, typ, path))


def _as_type(type_name: str) -> Step:
    wanted = _type_name(type_name[0].upper() + type_name[1:])

    def step(nodes: list[Node]) -> list[Node]:
        return [n for n in nodes if n.type == wanted or _is_subtype(n.type, wanted)]

    return step


def _is_subtype(typ: str | None, wanted: str) -> bool:
    parents = _MODEL["type2Parent"]
    while typ is not None:
        typ = parents.get(typ)
        if typ == wanted:
            return True
    return False


def _where_resolve_is(type_name: str) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        out = []
        for n in nodes:
            ref = n.value.get("reference") if isinstance(n.value, dict) else None
            if isinstance(ref, str) and reference_type(ref) == type_name:
                out.append(n)
        return out

    return step


def _where_equals(field: str, literal: str) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        return [n for n in nodes if isinstance(n.value, dict) and n.value.get(field) == literal]

    return step


def reference_type(ref: str) -> str | None:
    """The resource type a reference string points at (``Patient/1``, ``http://x/Patient/1``)."""
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2]
    return None


_SEGMENT = re.compile(
    r"""^(?:
        (?P<name>[a-z][A-Za-z0-9]*)
      | (?:as|ofType)\((?P<as>[A-Za-z]+)\)
      | where\(resolve\(\)\ is\ (?P<rtype>[A-Z][A-Za-z]+)\)
      | where\((?P<field>[a-z][A-Za-z]*)\ ?=\ ?'(?P<lit>[^']*)'\)
    )$""",
    re.VERBOSE,
)


def _split_dots(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "." and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _compile_segments(segments: list[str]) -> list[Step] | None:
    steps: list[Step] = []
    for seg in segments:
        m = _SEGMENT.match(seg.strip())
        if m is None:
            return None
        if m["name"]:
            steps.append(_child(m["name"]))
        elif m["as"]:
            steps.append(_as_type(m["as"]))
        elif m["rtype"]:
            steps.append(_where_resolve_is(m["rtype"]))
        else:
            steps.append(_where_equals(m["field"], m["lit"]))
    return steps


@dataclass(slots=True)
class _Piece:
    root: str  # resource type the piece starts from (may be Resource / DomainResource)
    steps: list[Step]


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath expression on its top-level ``|`` operators."""
    parts, depth, current = [], 0, []
    for ch in expression:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "|" and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


_EXISTS_NOT_FALSE = re.compile(r"^(?P<path>[A-Z][A-Za-z.]*)\.exists\(\) and (?P=path) != false$")
_AS_OUTER = re.compile(r"^\((?P<inner>.+) as (?P<type>[A-Za-z]+)\)(?P<rest>(\.[^.].*)?)$")
_AS_BARE = re.compile(r"^(?P<inner>[^()]+) as (?P<type>[A-Za-z]+)$")


def _compile_piece(piece: str) -> _Piece | None:
    m = _AS_OUTER.match(piece) or _AS_BARE.match(piece)
    if m:
        inner = _split_dots(m["inner"].strip())
        rest = _split_dots(m.groupdict().get("rest", "")[1:]) if m.groupdict().get("rest") else []
        head = _compile_segments(inner[1:])
        tail = _compile_segments(rest)
        if head is None or tail is None:
            return None
        return _Piece(inner[0], [*head, _as_type(m["type"]), *tail])
    segments = _split_dots(piece)
    if not segments[0][:1].isupper() or "(" in segments[0]:
        return None
    steps = _compile_segments(segments[1:])
    return _Piece(segments[0], steps) if steps is not None else None


def piece_root(piece: str) -> str | None:
    """The first type of a piece (``(Observation.value as X)`` -> Observation)."""
    m = re.match(r"^\(*([A-Z][A-Za-z]+)", piece)
    return m.group(1) if m else None


class CompiledPath:
    """An expression restricted to one resource type, evaluated into typed :class:`Node` s."""

    def __init__(self, expression: str, resource_type: str | None) -> None:
        self.expression = expression
        self.resource_type = resource_type
        pieces = [
            p
            for p in split_union(expression)
            if resource_type is None or piece_root(p) in {resource_type, *_BASES}
        ]
        self._present_not_false = False
        flag = _EXISTS_NOT_FALSE.match(pieces[0]) if len(pieces) == 1 else None
        if flag is not None and _compile_piece(flag["path"]) is not None:
            # ``X.exists() and X != false`` (Patient.deceased): a boolean, true when X is
            # there and is not the boolean false (a dateTime is not false)
            pieces = [flag["path"]]
            self._present_not_false = True
        compiled = [_compile_piece(p) for p in pieces]
        self.fast = all(c is not None for c in compiled)
        self._pieces = [c for c in compiled if c is not None]
        self._fallback = None
        if not self.fast:
            self.fallback_expression = " | ".join(pieces)
            self._fallback = fp_compile(self.fallback_expression, _MODEL)
        self.empty = not pieces

    def evaluate(self, resource: dict[str, Any]) -> list[Node]:
        """The nodes the expression selects in ``resource``."""
        if self.empty:
            return []
        if self._fallback is not None:
            try:
                values = self._fallback(resource, {})
            except Exception:  # fhirpathpy lacks a few functions (resolve(), …)
                log.debug("fhirpath fallback failed for %s", self.expression, exc_info=True)
                return []
            return [Node(v, None, "") for v in _flatten(values)]
        rt = resource.get("resourceType", "")
        if self._present_not_false:
            found = self._walk(resource, rt)
            return [Node(bool(found) and any(n.value is not False for n in found), "boolean", rt)]
        return self._walk(resource, rt)

    def _walk(self, resource: dict[str, Any], rt: str) -> list[Node]:
        out: list[Node] = []
        for piece in self._pieces:
            if piece.root != rt and piece.root not in _BASES:
                continue
            nodes = [Node(resource, None, rt)]
            for step in piece.steps:
                nodes = step(nodes)
                if not nodes:
                    break
            out.extend(nodes)
        return out

    def evaluate_relative(self, node: Node) -> list[Node]:
        """Evaluate a relative path (a composite component, e.g. ``value.as(Quantity)``)."""
        nodes = [node]
        for piece in self._pieces:
            for step in piece.steps:
                nodes = step(nodes)
        return nodes


def compile_relative(expression: str) -> CompiledPath:
    """Compile a relative expression such as ``code`` or ``value.as(Quantity)`` (composites)."""
    path = CompiledPath.__new__(CompiledPath)
    path.expression = expression
    path.resource_type = None
    path._fallback = None
    path._present_not_false = False
    path.empty = False
    steps = _compile_segments(_split_dots(expression))
    if steps is None:
        raise ValueError(f"unsupported composite component expression {expression!r}")
    path._pieces = [_Piece("", steps)]
    path.fast = True
    return path


def _flatten(values: Iterable[Any]) -> Iterable[Any]:
    for v in values:
        if isinstance(v, list):
            yield from _flatten(v)
        elif v is not None:
            yield getattr(v, "data", v)
