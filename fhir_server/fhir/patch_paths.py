"""Where a FHIRPath Patch path points: the elements it selects and the JSON location of each.

http://hl7.org/fhir/R4/fhirpatch.html evaluates each operation's ``path`` and then modifies the
elements it selected, so a path must yield *locations* (``container[key]`` or
``container[key][index]``), not values. fhirpathpy returns values detached from the tree (copies
of primitives, no list index), so the path itself is walked here, over the shared type model
(:mod:`fhir_server.fhir.model`), while ``where()`` criteria — arbitrary FHIRPath — are evaluated
by fhirpathpy on each candidate. The supported subset is a chain of these steps:

* ``Patient`` — a leading type name: the resource itself when it matches ``resourceType``
  (another resource type selects nothing); a leading element name starts at the resource;
* ``.name`` — child elements; choice elements by their base name (``deceased`` finds
  ``deceasedBoolean``) or full JSON name (``valueQuantity``); repeating elements expand into one
  item per entry; backtick-quoted names are accepted;
* ``[n]`` — the n-th item of the collection so far;
* ``.first()``, ``.last()``, ``.tail()``, ``.single()``, ``.skip(n)``, ``.take(n)``;
* ``.where(criterion)`` — the criterion is any FHIRPath expression, evaluated by fhirpathpy on
  each item (with the R4 model, the item's type as base, ``%resource`` / ``%rootResource`` set);
* ``.ofType(T)`` / ``.as(T)`` — items of type ``T`` or a subtype (choice items by their type,
  resources by ``resourceType``, following ``baseDefinition`` in the model);
* ``.extension('url')`` — the ``extension`` children with that url.

Anything else (operators, ``$this`` or ``%resource`` at the start of a path, other functions)
raises :class:`PathError` with MSO-PATCH-014; a malformed path MSO-PATCH-011.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fhirpathpy
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as _fhirpath_models

from fhir_server.fhir.model import COMPLEX, PRIMITIVE, RESOURCE, Slot, model

# --------------------------------------------------------------------------------------------
# Type questions, answered by the shared model
# --------------------------------------------------------------------------------------------


def slot_of(type_key: str | None, json_key: str) -> Slot | None:
    """What ``json_key`` holds in an object of type key ``type_key`` (None: unknown)."""
    return model().slot(type_key, json_key) if type_key else None


def is_known(type_key: str | None) -> bool:
    """True when the model defines the elements of ``type_key`` (a complex type or resource)."""
    return type_key is not None and model().info(type_key) is not None


def item_type(slot: Slot | None) -> str | None:
    """The type key of one value of ``slot``: a primitive, a complex type key or a resource."""
    if slot is None:
        return None
    if slot.kind == COMPLEX:
        return slot.target
    if slot.kind == RESOURCE:
        return slot.target or "Resource"
    return slot.type_code


def is_complex(type_key: str | None) -> bool | None:
    """True for complex types and resources, False for primitives, None when unknown."""
    kind = model().kind(type_key) if type_key else None
    return None if kind is None else kind != PRIMITIVE


def choice_slot(type_key: str | None, json_key: str) -> Slot | None:
    """The slot of ``json_key`` when it is a variant of a choice element (``deceasedBoolean``)."""
    slot = slot_of(type_key, json_key)
    return slot if slot is not None and slot.element.choice and not slot.underscore else None


def is_choice(type_key: str | None, name: str) -> bool:
    """True when ``type_key`` defines ``name[x]`` (lenient when the type is unknown)."""
    if not is_known(type_key):
        return True
    assert type_key is not None
    element = model().element(type_key, name)
    return element is not None and element.choice


def choice_keys(type_key: str | None, name: str, value: dict[str, Any]) -> list[str]:
    """The JSON keys of ``value`` that are variants of choice element ``name``."""
    if is_known(type_key):
        assert type_key is not None
        element = model().element(type_key, name)
        if element is None or not element.choice:
            return []
        return [k for k in element.keys if k in value and not k.startswith("_")]
    types = model()
    return [
        k for k in value if k.startswith(name) and types.type_of_suffix(k[len(name) :]) is not None
    ]


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX = re.compile(r"\[\s*(\d+)\s*\]")
_INT = re.compile(r"\s*(\d+)\s*")
_TYPE = re.compile(r"\s*((?:[A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*)\s*")
_STRING = re.compile(r"\s*'((?:[^'\\]|\\.)*)'\s*")
_NO_ARG_FUNCTIONS = frozenset({"first", "last", "tail", "single"})
_SUPPORTED_FUNCTIONS = _NO_ARG_FUNCTIONS | {"where", "skip", "take", "ofType", "as", "extension"}


class PathError(Exception):
    """A path the resolver cannot use; ``code`` says whether it is invalid or unsupported.

    The message names the problem and never quotes resource content.
    """

    def __init__(self, message: str, code: str = "MSO-PATCH-011") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Step:
    kind: str  # "member" | "index" | "call"
    name: str = ""
    arg: str = ""
    number: int = 0


@dataclass(slots=True)
class Node:
    """One selected element and where it lives: ``container[key]`` or ``container[key][index]``."""

    value: Any
    container: dict[str, Any] | None
    key: str | None
    index: int | None
    type_def: str | None  # model type key of the value: HumanName, Patient.contact, boolean
    parent_def: str | None  # model type key of the container
    path: str | None  # FHIRPath type path of complex values: Patient, HumanName, Patient.contact
    choice: str | None  # the choice base name when key is e.g. deceasedBoolean


@lru_cache(maxsize=512)
def parse_path(path: str) -> tuple[Step, ...]:
    """Split a patch path into steps (see the module docstring for the accepted subset)."""
    steps: list[Step] = []
    i, n = 0, len(path)
    expect_name = True
    while True:
        while i < n and path[i].isspace():
            i += 1
        if i >= n:
            break
        if expect_name:
            if path[i] == "`":
                end = path.find("`", i + 1)
                if end < 0:
                    raise PathError("unterminated `identifier`")
                name, i = path[i + 1 : end], end + 1
            else:
                match = _IDENT.match(path, i)
                if not match:
                    raise _unsupported_or_invalid(path, i)
                name, i = match.group(), match.end()
            while i < n and path[i].isspace():
                i += 1
            if i < n and path[i] == "(":
                end = _closing_paren(path, i)
                steps.append(_call_step(name, path[i + 1 : end]))
                i = end + 1
            else:
                steps.append(Step("member", name))
            expect_name = False
        elif path[i] == ".":
            i += 1
            expect_name = True
        elif path[i] == "[":
            match = _INDEX.match(path, i)
            if not match:
                raise PathError("an indexer must be a non-negative integer literal")
            steps.append(Step("index", number=int(match.group(1))))
            i = match.end()
        else:
            raise _unsupported_or_invalid(path, i)
    if not steps or expect_name:
        raise PathError("the path is empty or ends with '.'")
    return tuple(steps)


def _unsupported_or_invalid(path: str, i: int) -> PathError:
    if path[i] in "$%" or path[i] in "=!<>+-*/&|~'" or path[i].isdigit():
        return PathError(
            f"'{path[i:]}' is outside the supported FHIRPath subset", code="MSO-PATCH-014"
        )
    return PathError(f"unexpected {path[i]!r} at position {i}")


def _closing_paren(text: str, start: int) -> int:
    """Index of the ``)`` matching the ``(`` at ``start``, skipping quoted strings."""
    depth = 0
    i = start
    quote: str | None = None
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'`\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise PathError("unbalanced parentheses")


def _call_step(name: str, arg: str) -> Step:
    if name not in _SUPPORTED_FUNCTIONS:
        raise PathError(f"function {name}() is outside the supported subset", "MSO-PATCH-014")
    if name in _NO_ARG_FUNCTIONS:
        if arg.strip():
            raise PathError(f"{name}() takes no argument")
        return Step("call", name)
    if name == "where":
        if not arg.strip():
            raise PathError("where() needs a criterion")
        return Step("call", name, arg.strip())
    if name in ("skip", "take"):
        match = _INT.fullmatch(arg)
        if not match:
            raise PathError(f"{name}() needs a non-negative integer literal")
        return Step("call", name, number=int(match.group(1)))
    if name == "extension":
        match = _STRING.fullmatch(arg)
        if not match:
            raise PathError("extension() needs a string literal url")
        return Step("call", name, re.sub(r"\\(.)", r"\1", match.group(1)))
    match = _TYPE.fullmatch(arg)  # ofType / as
    if not match:
        raise PathError(f"{name}() needs a type name")
    return Step("call", name, match.group(1))


class Resolver:
    """Evaluates parsed patch paths against one resource, keeping each item's location."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def root_node(self) -> Node:
        rt = self.root.get("resourceType")
        return Node(self.root, None, None, None, rt, None, rt, None)

    def select(self, steps: tuple[Step, ...]) -> list[Node]:
        root = self.root_node()
        first = steps[0]
        if first.kind == "member" and first.name[:1].isupper():
            # A leading type name filters the root: Patient.name on a Patient, nothing otherwise.
            if first.name == self.root.get("resourceType"):
                return self.select_from([root], steps[1:])
            if model().is_resource(first.name):
                return (
                    self.select_from([root], steps[1:]) if _type_matches(root, first.name) else []
                )
        return self.select_from([root], steps)

    def select_from(self, nodes: list[Node], steps: tuple[Step, ...]) -> list[Node]:
        for step in steps:
            nodes = self._step(nodes, step)
        return nodes

    def _step(self, nodes: list[Node], step: Step) -> list[Node]:
        if step.kind == "member":
            return [child for node in nodes for child in _children(node, step.name)]
        if step.kind == "index":
            return nodes[step.number : step.number + 1]
        name = step.name
        if name == "first":
            return nodes[:1]
        if name == "last":
            return nodes[-1:]
        if name == "tail":
            return nodes[1:]
        if name == "skip":
            return nodes[step.number :]
        if name == "take":
            return nodes[: step.number]
        if name == "single":
            if len(nodes) > 1:
                raise PathError("single() applied to more than one item", "MSO-PATCH-012")
            return nodes
        if name in ("ofType", "as"):
            return [node for node in nodes if _type_matches(node, step.arg)]
        if name == "extension":
            return [
                child
                for node in nodes
                for child in _children(node, "extension")
                if isinstance(child.value, dict) and child.value.get("url") == step.arg
            ]
        return [node for node in nodes if self._criterion(node, step.arg)]

    def _criterion(self, node: Node, expression: str) -> bool:
        subject: Any = node.value
        if isinstance(subject, dict) and node.path:
            subject = ResourceNode.create_node(subject, node.path)
        context = {"resource": self.root, "rootResource": self.root}
        try:
            result = _compiled(expression)(subject, context)
        except Exception as exc:  # fhirpathpy raises bare Exceptions for bad expressions
            # Its text may quote the data it was evaluating: name the criterion, not the cause.
            raise PathError("a where() criterion cannot be evaluated") from exc
        return result == [True]


@lru_cache(maxsize=256)
def _compiled(expression: str) -> Any:
    return fhirpathpy.compile(expression, _fhirpath_models["r4"])


def find_key(
    value: dict[str, Any], type_def: str | None, name: str
) -> tuple[str | None, str | None]:
    """The JSON key holding element ``name`` in ``value`` and its choice base (if a choice)."""
    if name in value:
        return name, None
    if not is_choice(type_def, name):
        return None, None
    keys = choice_keys(type_def, name, value)
    return (keys[0], name) if keys else (None, None)


def _children(node: Node, name: str) -> list[Node]:
    value = node.value
    if not isinstance(value, dict) or name.startswith("_"):
        return []
    key, choice = find_key(value, node.type_def, name)
    if key is None:
        return []
    slot = slot_of(node.type_def, key)
    ref = item_type(slot) if slot else None
    if ref is None and choice:
        ref = model().type_of_suffix(key[len(choice) :])
    raw = value[key]
    items = list(enumerate(raw)) if isinstance(raw, list) else [(None, raw)]
    out = []
    for index, item in items:
        if item is None:
            continue
        type_def = ref
        if isinstance(item, dict) and isinstance(item.get("resourceType"), str):
            type_def = item["resourceType"]
        elif slot is not None and slot.kind == RESOURCE:
            type_def = None
        # The model's type keys are fhirpathpy's type paths too (Patient.contact, HumanName).
        path = type_def if isinstance(item, dict) else None
        out.append(Node(item, value, key, index, type_def, node.type_def, path, choice))
    return out


def _type_name(node: Node) -> str | None:
    if node.choice and node.key:
        suffix = node.key[len(node.choice) :]
        return model().type_of_suffix(suffix) or suffix
    value = node.value
    if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
        return value["resourceType"]
    if node.type_def:
        return "BackboneElement" if "." in node.type_def else node.type_def
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "decimal"
    if isinstance(value, str):
        return "string"
    return None


def _type_matches(node: Node, wanted: str) -> bool:
    """FHIRPath ``is``: the node's type is ``wanted`` or derives from it.

    Names compare case-insensitively so that ``System.Boolean`` matches FHIR ``boolean``.
    """
    wanted = wanted.split(".", 1)[1] if wanted.startswith(("FHIR.", "System.")) else wanted
    wanted = wanted.lower()
    name = _type_name(node)
    types = model()
    while name is not None:
        if name.lower() == wanted:
            return True
        name = types.base(name)
    return False
