"""The patch interaction's pure core: JSON Patch and FHIRPath Patch.

Implements the body handling of http://hl7.org/fhir/R4/http.html#patch — RFC 6902 JSON Patch
(``application/json-patch+json``) and FHIRPath Patch (http://hl7.org/fhir/R4/fhirpatch.html, a
``Parameters`` resource sent as ``application/fhir+json``). Everything here is transport- and
storage-free: a resource dict and a parsed body go in, a new resource dict comes out (the input is
never mutated), and every failure is a :class:`FhirError` with a stable code:

=============  ======  =========================================================================
Code           Status  Meaning
=============  ======  =========================================================================
MSO-PATCH-001  400     JSON Patch body is not a JSON array of well-formed operation objects
MSO-PATCH-002  422     a JSON Patch ``test`` operation failed
MSO-PATCH-003  422     JSON Patch path does not exist, is not a valid pointer, or conflicts
MSO-PATCH-004  422     an operation would change the resource's ``resourceType`` or ``id``
MSO-PATCH-011  400     FHIRPath Patch body is not a well-formed ``Parameters`` patch (including a
                       path that is not valid FHIRPath or a ``where()`` criterion that fails)
MSO-PATCH-012  422     a path selects no element where one is required, or more than one
MSO-PATCH-013  422     ``index`` / ``source`` / ``destination`` outside the list
MSO-PATCH-014  400     a path uses FHIRPath outside the supported subset (below)
MSO-PATCH-015  422     the selected element cannot take the operation: ``add`` to an element
                       that already has a (non-repeating) value or to a primitive, ``insert`` /
                       ``move`` on something that is not a list, an element name the type does
                       not define, a value of the wrong kind (complex vs primitive), or
                       ``delete`` / ``replace`` of the resource itself
MSO-PATCH-415  415     the media type is neither JSON Patch nor FHIR JSON
=============  ======  =========================================================================

Each error's ``expression`` names where it happened: ``["/<i>", "<pointer>"]`` for JSON Patch
(a pointer to the operation inside the patch document, then its ``path``) and
``["Parameters.parameter[<i>]", "<path>"]`` for FHIRPath Patch.

FHIRPath Patch paths are resolved by a small resolver that keeps track of *where* each selected
element lives in the JSON tree (fhirpathpy returns copies, so its results cannot be located).
The supported subset of FHIRPath is a chain of these steps:

* ``Patient`` — a leading type name: the resource itself when it matches ``resourceType``
  (another resource type selects nothing); a leading element name starts at the resource;
* ``.name`` — child elements; choice elements by their base name (``deceased`` finds
  ``deceasedBoolean``) or full JSON name (``valueQuantity``); repeating elements expand into one
  item per entry; backtick-quoted names are accepted;
* ``[n]`` — the n-th item of the collection so far;
* ``.first()``, ``.last()``, ``.tail()``, ``.single()``, ``.skip(n)``, ``.take(n)``;
* ``.where(criterion)`` — the criterion is any FHIRPath expression, evaluated by fhirpathpy on
  each item (with the R4 model, the item's type as base, ``%resource`` / ``%rootResource`` set);
* ``.ofType(T)`` / ``.as(T)`` — items of type ``T`` or a subtype (choice items by their type
  suffix, resources by ``resourceType``);
* ``.extension('url')`` — the ``extension`` children with that url.

Anything else (operators, ``$this`` or ``%resource`` at the start of a path, other functions)
is rejected with MSO-PATCH-014. Values are converted to the JSON of the target element:
``valueX`` gives its JSON as is (``_valueX`` becomes the primitive's ``_name`` extension),
``resource`` gives a resource (for ``contained``), and a nested ``part`` list gives an object
built recursively (repeated part names, or a part for a repeating element, become arrays).
Choice elements take their JSON name from the value's type: ``add`` with ``name`` ``deceased``
and ``valueBoolean`` writes ``deceasedBoolean``; ``replace`` of ``Patient.deceased`` with a
``valueDateTime`` swaps ``deceasedBoolean`` for ``deceasedDateTime``. Primitive arrays keep
their parallel ``_name`` arrays in step. Objects or arrays left empty by a FHIRPath Patch are
removed, as FHIR JSON forbids them.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import fhirpathpy
import jsonpatch
import jsonpointer
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as _fhirpath_models

from fhir_server.fhir.definitions import is_resource_type, load_json
from fhir_server.fhir.jsonio import dumps, loads
from fhir_server.fhir.outcome import FhirError

JSON_PATCH_MEDIA_TYPE = "application/json-patch+json"
FHIR_JSON_MEDIA_TYPE = "application/fhir+json"
JSON_MEDIA_TYPE = "application/json"

# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def apply_patch(resource: dict[str, Any], body: Any, content_type: str) -> dict[str, Any]:
    """Apply a patch body to ``resource`` according to the request's ``Content-Type``.

    ``application/json-patch+json`` is JSON Patch; ``application/fhir+json`` is FHIRPath Patch,
    as is ``application/json`` when the body is a ``Parameters`` resource. ``body`` is the parsed
    JSON (raw bytes are parsed here). Any other media type is a 415 (MSO-PATCH-415).
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in (JSON_PATCH_MEDIA_TYPE, FHIR_JSON_MEDIA_TYPE, JSON_MEDIA_TYPE):
        raise _unsupported_media(content_type)
    if isinstance(body, bytes | bytearray | memoryview):
        body = loads(bytes(body))
    if media == JSON_PATCH_MEDIA_TYPE:
        return apply_json_patch(resource, body)
    if media == FHIR_JSON_MEDIA_TYPE:
        return apply_fhirpath_patch(resource, body)
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        return apply_fhirpath_patch(resource, body)
    raise _unsupported_media(
        content_type,
        "an application/json patch body must be a FHIRPath Patch Parameters resource; "
        f"send JSON Patch as {JSON_PATCH_MEDIA_TYPE}",
    )


def _unsupported_media(content_type: str, detail: str | None = None) -> FhirError:
    message = (
        f"Unsupported patch media type {content_type!r}: use {JSON_PATCH_MEDIA_TYPE} (JSON Patch) "
        f"or {FHIR_JSON_MEDIA_TYPE} (FHIRPath Patch)"
    )
    if detail:
        message = f"{message}; {detail}"
    return FhirError(415, "not-supported", message, code="MSO-PATCH-415")


def _identity(doc: Any) -> tuple[Any, ...]:
    """What a patch may never change: the resourceType and the id (including its presence)."""
    if not isinstance(doc, dict):
        return (type(doc).__name__,)
    return ("object", doc.get("resourceType"), "id" in doc, doc.get("id"))


# --------------------------------------------------------------------------------------------
# JSON Patch (RFC 6902)
# --------------------------------------------------------------------------------------------

_JSON_PATCH_MEMBERS: dict[str, tuple[str, ...]] = {
    "add": ("value",),
    "remove": (),
    "replace": ("value",),
    "move": ("from",),
    "copy": ("from",),
    "test": ("value",),
}


def apply_json_patch(resource: dict[str, Any], operations: Any) -> dict[str, Any]:
    """Apply an RFC 6902 JSON Patch document to a copy of ``resource`` and return the copy.

    Operations are applied one at a time (with the ``jsonpatch`` library) so that a failure names
    the operation's index and path. ``test`` compares JSON values strictly (``true`` is not
    ``1``). Raises :class:`FhirError` MSO-PATCH-001/002/003/004 (see the module docstring).
    """
    ops = _validated_json_patch(operations)
    before = _identity(resource)
    doc: Any = copy.deepcopy(resource)
    for i, op in enumerate(ops):
        path = op["path"]
        try:
            doc = jsonpatch.JsonPatch([copy.deepcopy(op)]).apply(doc, in_place=True)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise _json_patch_error(i, op, 422, "processing", "MSO-PATCH-002", _brief(exc)) from exc
        except jsonpatch.InvalidJsonPatch as exc:
            raise _json_patch_error(i, op, 400, "invalid", "MSO-PATCH-001", _brief(exc)) from exc
        except (
            jsonpatch.JsonPatchException,
            jsonpointer.JsonPointerException,
            KeyError,
            IndexError,
            TypeError,
            ValueError,
        ) as exc:
            raise _json_patch_error(i, op, 422, "processing", "MSO-PATCH-003", _brief(exc)) from exc
        if op["op"] == "test":
            actual = jsonpointer.resolve_pointer(doc, path)
            if not _json_equal(actual, op["value"]):
                detail = f"value {_short_json(actual)} is not {_short_json(op['value'])}"
                raise _json_patch_error(i, op, 422, "processing", "MSO-PATCH-002", detail)
        if _identity(doc) != before:
            raise _json_patch_error(
                i,
                op,
                422,
                "invariant",
                "MSO-PATCH-004",
                "a patch may not change resourceType or id",
            )
    return doc


def _validated_json_patch(operations: Any) -> list[dict[str, Any]]:
    """Check the shape of a JSON Patch document (MSO-PATCH-001) before applying anything."""
    if not isinstance(operations, list):
        raise FhirError(
            400,
            "invalid",
            "A JSON Patch body must be a JSON array of operation objects",
            code="MSO-PATCH-001",
        )
    for i, op in enumerate(operations):
        if not isinstance(op, dict):
            raise _json_patch_error(i, {}, 400, "invalid", "MSO-PATCH-001", "not a JSON object")
        name = op.get("op")
        if name not in _JSON_PATCH_MEMBERS:
            raise _json_patch_error(
                i, op, 400, "invalid", "MSO-PATCH-001", f"unknown or missing op {name!r}"
            )
        if not isinstance(op.get("path"), str):
            raise _json_patch_error(i, op, 400, "invalid", "MSO-PATCH-001", "missing string 'path'")
        for member in _JSON_PATCH_MEMBERS[name]:
            if member not in op:
                raise _json_patch_error(
                    i, op, 400, "invalid", "MSO-PATCH-001", f"{name!r} requires {member!r}"
                )
        if "from" in _JSON_PATCH_MEMBERS[name] and not isinstance(op["from"], str):
            raise _json_patch_error(
                i, op, 400, "invalid", "MSO-PATCH-001", "'from' must be a string"
            )
    return operations


def _json_patch_error(
    index: int, op: dict[str, Any], status: int, issue_code: str, code: str, detail: str
) -> FhirError:
    path = op.get("path")
    where = f"JSON Patch operation {index}"
    if isinstance(op.get("op"), str):
        where += f" ({op['op']} {path!r})" if isinstance(path, str) else f" ({op['op']})"
    expression = [f"/{index}"] + ([path] if isinstance(path, str) else [])
    return FhirError(status, issue_code, f"{where}: {detail}", code=code, expression=expression)


def _brief(exc: Exception) -> str:
    """The library's message without the (possibly large) document it sometimes embeds."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _short_json(value: Any) -> str:
    text = dumps(value).decode()
    return text if len(text) <= 80 else text[:77] + "..."


def _json_equal(a: Any, b: Any) -> bool:
    """RFC 6902 equality: same JSON type and value (numbers compare numerically)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------------------------
# FHIR type information (from the packaged R4 JSON schema and fhirpathpy's R4 model)
# --------------------------------------------------------------------------------------------


@cache
def _definitions() -> dict[str, dict[str, Any]]:
    return load_json("fhir.schema.json")["definitions"]


def _properties(type_def: str | None) -> dict[str, Any] | None:
    """The JSON properties of a schema definition, or None when the type is not complex/known."""
    if type_def is None:
        return None
    definition = _definitions().get(type_def)
    return definition.get("properties") if definition else None


def _is_array(prop: dict[str, Any] | None) -> bool:
    return bool(prop) and prop.get("type") == "array"


_INLINE_PRIMITIVES = {"string": "string", "boolean": "boolean", "number": "decimal"}


def _ref(prop: dict[str, Any] | None) -> str | None:
    """The schema definition an element refers to (``HumanName``, ``Patient_Contact`` …).

    Primitives the schema spells inline get the matching primitive definition: ``code`` for an
    enum, else ``string``, ``boolean`` or ``decimal``.
    """
    if not prop:
        return None
    target = prop.get("items", {}) if _is_array(prop) else prop
    ref = target.get("$ref")
    if isinstance(ref, str):
        return ref.rsplit("/", 1)[-1]
    if "enum" in target:
        return "code"
    return _INLINE_PRIMITIVES.get(target.get("type", ""))


@cache
def _choice_suffixes() -> frozenset[str]:
    """Every type that may appear as a choice suffix (``Boolean``, ``Quantity`` …)."""
    model = _fhirpath_models["r4"]
    return frozenset(t for types in model["choiceTypePaths"].values() for t in types)


def _suffix_def(suffix: str | None) -> str | None:
    """The schema definition for a choice suffix: ``Quantity`` or ``boolean``."""
    if not suffix:
        return None
    if suffix in _definitions():
        return suffix
    lowered = suffix[0].lower() + suffix[1:]
    return lowered if lowered in _definitions() else None


def _is_complex_def(type_def: str | None) -> bool | None:
    """True for object types, False for primitives, None when unknown."""
    if type_def is None:
        return None
    if type_def == "ResourceList":
        return True
    definition = _definitions().get(type_def)
    if definition is None:
        return None
    return "properties" in definition


def _choice_base_of(key: str, name: str) -> bool:
    return key.startswith(name) and key[len(name) :] in _choice_suffixes()


def _is_choice(type_def: str | None, base: str) -> bool:
    """True when ``type_def`` defines ``base[x]`` (lenient when the type is unknown)."""
    props = _properties(type_def)
    if props is None:
        return True
    return base not in props and sum(1 for k in props if _choice_base_of(k, base)) >= 2


def _choice_base(type_def: str | None, key: str) -> str | None:
    """``deceased`` for ``deceasedBoolean`` when ``type_def`` defines ``deceased[x]``."""
    for suffix in _choice_suffixes():
        base = key[: -len(suffix)]
        if key.endswith(suffix) and base and _is_choice(type_def, base):
            return base
    return None


# --------------------------------------------------------------------------------------------
# Path parsing and resolution
# --------------------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX = re.compile(r"\[\s*(\d+)\s*\]")
_INT = re.compile(r"\s*(\d+)\s*")
_TYPE = re.compile(r"\s*((?:[A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*)\s*")
_STRING = re.compile(r"\s*'((?:[^'\\]|\\.)*)'\s*")
_NO_ARG_FUNCTIONS = frozenset({"first", "last", "tail", "single"})
_SUPPORTED_FUNCTIONS = _NO_ARG_FUNCTIONS | {"where", "skip", "take", "ofType", "as", "extension"}


class _PathError(Exception):
    """A path the resolver cannot use; ``code`` says whether it is invalid or unsupported."""

    def __init__(self, message: str, code: str = "MSO-PATCH-011") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class _Step:
    kind: str  # "member" | "index" | "call"
    name: str = ""
    arg: str = ""
    number: int = 0


@dataclass(slots=True)
class _Node:
    """One selected element and where it lives: ``container[key]`` or ``container[key][index]``."""

    value: Any
    container: dict[str, Any] | None
    key: str | None
    index: int | None
    type_def: str | None  # schema definition of the value (None for unknown / inline primitives)
    parent_def: str | None  # schema definition of the container
    path: str | None  # FHIRPath type path of complex values: Patient, HumanName, Patient.contact
    choice: str | None  # the choice base name when key is e.g. deceasedBoolean


@lru_cache(maxsize=512)
def _parse_path(path: str) -> tuple[_Step, ...]:
    """Split a patch path into steps (see the module docstring for the accepted subset)."""
    steps: list[_Step] = []
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
                    raise _PathError("unterminated `identifier`")
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
                steps.append(_Step("member", name))
            expect_name = False
        elif path[i] == ".":
            i += 1
            expect_name = True
        elif path[i] == "[":
            match = _INDEX.match(path, i)
            if not match:
                raise _PathError("an indexer must be a non-negative integer literal")
            steps.append(_Step("index", number=int(match.group(1))))
            i = match.end()
        else:
            raise _unsupported_or_invalid(path, i)
    if not steps or expect_name:
        raise _PathError("the path is empty or ends with '.'")
    return tuple(steps)


def _unsupported_or_invalid(path: str, i: int) -> _PathError:
    if path[i] in "$%" or path[i] in "=!<>+-*/&|~'" or path[i].isdigit():
        return _PathError(
            f"'{path[i:]}' is outside the supported FHIRPath subset", code="MSO-PATCH-014"
        )
    return _PathError(f"unexpected {path[i]!r} at position {i}")


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
    raise _PathError("unbalanced parentheses")


def _call_step(name: str, arg: str) -> _Step:
    if name not in _SUPPORTED_FUNCTIONS:
        raise _PathError(f"function {name}() is outside the supported subset", "MSO-PATCH-014")
    if name in _NO_ARG_FUNCTIONS:
        if arg.strip():
            raise _PathError(f"{name}() takes no argument")
        return _Step("call", name)
    if name == "where":
        if not arg.strip():
            raise _PathError("where() needs a criterion")
        return _Step("call", name, arg.strip())
    if name in ("skip", "take"):
        match = _INT.fullmatch(arg)
        if not match:
            raise _PathError(f"{name}() needs a non-negative integer literal")
        return _Step("call", name, number=int(match.group(1)))
    if name == "extension":
        match = _STRING.fullmatch(arg)
        if not match:
            raise _PathError("extension() needs a string literal url")
        return _Step("call", name, re.sub(r"\\(.)", r"\1", match.group(1)))
    match = _TYPE.fullmatch(arg)  # ofType / as
    if not match:
        raise _PathError(f"{name}() needs a type name")
    return _Step("call", name, match.group(1))


class _Resolver:
    """Evaluates parsed patch paths against one resource, keeping each item's location."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def root_node(self) -> _Node:
        rt = self.root.get("resourceType")
        return _Node(self.root, None, None, None, rt, None, rt, None)

    def select(self, steps: tuple[_Step, ...]) -> list[_Node]:
        root = self.root_node()
        first = steps[0]
        if first.kind == "member" and first.name[:1].isupper():
            # A leading type name filters the root: Patient.name on a Patient, nothing otherwise.
            if first.name == self.root.get("resourceType"):
                return self.select_from([root], steps[1:])
            if is_resource_type(first.name) or first.name in ("Resource", "DomainResource"):
                return (
                    self.select_from([root], steps[1:]) if _type_matches(root, first.name) else []
                )
        return self.select_from([root], steps)

    def select_from(self, nodes: list[_Node], steps: tuple[_Step, ...]) -> list[_Node]:
        for step in steps:
            nodes = self._step(nodes, step)
        return nodes

    def _step(self, nodes: list[_Node], step: _Step) -> list[_Node]:
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
                raise _PathError("single() applied to more than one item", "MSO-PATCH-012")
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

    def _criterion(self, node: _Node, expression: str) -> bool:
        subject: Any = node.value
        if isinstance(subject, dict) and node.path:
            subject = ResourceNode.create_node(subject, node.path)
        context = {"resource": self.root, "rootResource": self.root}
        try:
            result = _compiled(expression)(subject, context)
        except Exception as exc:  # fhirpathpy raises bare Exceptions for bad expressions
            raise _PathError(f"where({expression}) cannot be evaluated: {exc}") from exc
        return result == [True]


@lru_cache(maxsize=256)
def _compiled(expression: str) -> Any:
    return fhirpathpy.compile(expression, _fhirpath_models["r4"])


def _find_key(
    value: dict[str, Any], type_def: str | None, name: str
) -> tuple[str | None, str | None]:
    """The JSON key holding element ``name`` in ``value`` and its choice base (if a choice)."""
    if name in value:
        return name, None
    if not _is_choice(type_def, name):
        return None, None
    props = _properties(type_def)
    for key in value:
        if _choice_base_of(key, name) and (props is None or key in props):
            return key, name
    return None, None


def _children(node: _Node, name: str) -> list[_Node]:
    value = node.value
    if not isinstance(value, dict) or name.startswith("_"):
        return []
    key, choice = _find_key(value, node.type_def, name)
    if key is None:
        return []
    props = _properties(node.type_def)
    prop = props.get(key) if props else None
    ref = _ref(prop) or (_suffix_def(key[len(choice) :]) if choice else None)
    raw = value[key]
    items = list(enumerate(raw)) if isinstance(raw, list) else [(None, raw)]
    out = []
    for index, item in items:
        if item is None:
            continue
        type_def = ref
        if isinstance(item, dict) and isinstance(item.get("resourceType"), str):
            type_def = item["resourceType"]
        elif ref == "ResourceList":
            type_def = None
        path = None
        if isinstance(item, dict):
            if type_def and "_" in type_def and node.path:
                path = f"{node.path}.{choice or key}"
            else:
                path = type_def
        out.append(_Node(item, value, key, index, type_def, node.type_def, path, choice))
    return out


def _type_name(node: _Node) -> str | None:
    if node.choice and node.key:
        return node.key[len(node.choice) :]
    value = node.value
    if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
        return value["resourceType"]
    if node.type_def:
        return "BackboneElement" if "_" in node.type_def else node.type_def
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "decimal"
    if isinstance(value, str):
        return "string"
    return None


def _type_matches(node: _Node, wanted: str) -> bool:
    """FHIRPath ``is``: the node's type is ``wanted`` or derives from it."""
    wanted = wanted.split(".", 1)[1] if wanted.startswith(("FHIR.", "System.")) else wanted
    parents = _fhirpath_models["r4"]["type2Parent"]
    name = _type_name(node)
    seen = 0
    while name and seen < 20:
        if name.lower() == wanted.lower():
            return True
        name = parents.get(name) or parents.get(name[0].lower() + name[1:])
        seen += 1
    return False


# --------------------------------------------------------------------------------------------
# FHIRPath Patch: the Parameters body
# --------------------------------------------------------------------------------------------

_PART_NAMES = frozenset({"type", "path", "name", "value", "index", "source", "destination"})
_REQUIRED_PARTS: dict[str, tuple[str, ...]] = {
    "add": ("path", "name", "value"),
    "insert": ("path", "value", "index"),
    "delete": ("path",),
    "replace": ("path", "value"),
    "move": ("path", "source", "destination"),
}
_INTEGER_KEYS = ("valueInteger", "valueUnsignedInt", "valuePositiveInt")


@dataclass(slots=True)
class _Value:
    """An operation's value before it is fitted to its target element."""

    json: Any = None  # valueX content or resource
    extension: Any = None  # the _valueX primitive extension
    suffix: str | None = None  # X of valueX
    parts: list[dict[str, Any]] | None = None  # nested part list (complex value)


@dataclass(slots=True)
class _Operation:
    position: int
    type: str
    path: str
    steps: tuple[_Step, ...]
    name: str | None = None
    value: _Value | None = None
    index: int | None = None
    source: int | None = None
    destination: int | None = None

    def error(self, status: int, issue_code: str, code: str, detail: str) -> FhirError:
        return FhirError(
            status,
            issue_code,
            f"FHIRPath Patch operation {self.position} ({self.type} {self.path!r}): {detail}",
            code=code,
            expression=[f"Parameters.parameter[{self.position}]", self.path],
        )


def _malformed(detail: str, position: int | None = None) -> FhirError:
    where = f"FHIRPath Patch operation {position}: " if position is not None else ""
    expression = [f"Parameters.parameter[{position}]"] if position is not None else None
    return FhirError(
        400,
        "invalid",
        f"{where}{detail}",
        code="MSO-PATCH-011",
        expression=expression,
    )


def _value_keys(part: dict[str, Any]) -> list[str]:
    return [k for k in part if k.startswith("value") and len(k) > 5 and k[5].isupper()]


def _parse_value(part: dict[str, Any], position: int, depth: int = 0) -> _Value:
    """Read a ``value`` part: exactly one of ``valueX``, ``resource`` or a nested ``part`` list."""
    keys = _value_keys(part)
    present = len(keys) + ("resource" in part) + ("part" in part)
    if present != 1:
        raise _malformed(
            f"part {part.get('name')!r} needs exactly one of value[x], resource or part", position
        )
    if keys:
        key = keys[0]
        return _Value(json=part[key], extension=part.get("_" + key), suffix=key[5:])
    if "resource" in part:
        resource = part["resource"]
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise _malformed("a resource value must be a resource", position)
        return _Value(json=resource)
    nested = part["part"]
    if not isinstance(nested, list) or not nested or depth > 50:
        raise _malformed(f"part {part.get('name')!r} has an empty or invalid part list", position)
    for child in nested:
        if (
            not isinstance(child, dict)
            or not isinstance(child.get("name"), str)
            or not child["name"]
        ):
            raise _malformed("every nested part needs a name", position)
        _parse_value(child, position, depth + 1)  # validate the whole tree up front
    return _Value(parts=nested)


def _string_part(part: dict[str, Any], position: int) -> str:
    for key in ("valueString", "valueCode"):
        if isinstance(part.get(key), str) and part[key]:
            return part[key]
    raise _malformed(f"part {part.get('name')!r} must have a valueString or valueCode", position)


def _integer_part(part: dict[str, Any], position: int) -> int:
    for key in _INTEGER_KEYS:
        if key in part:
            value = part[key]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    raise _malformed(f"part {part.get('name')!r} must have a valueInteger", position)


def _parse_operations(parameters: Any) -> list[_Operation]:
    """Validate the Parameters body (MSO-PATCH-011) and read its operations."""
    if not isinstance(parameters, dict) or parameters.get("resourceType") != "Parameters":
        raise _malformed("a FHIRPath Patch body must be a Parameters resource")
    entries = parameters.get("parameter", [])
    if not isinstance(entries, list):
        raise _malformed("Parameters.parameter must be an array")
    operations = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("name") != "operation":
            raise _malformed("every parameter must be named 'operation'", position)
        parts = entry.get("part")
        if not isinstance(parts, list):
            raise _malformed("an operation needs a part list", position)
        by_name: dict[str, dict[str, Any]] = {}
        for part in parts:
            if not isinstance(part, dict) or part.get("name") not in _PART_NAMES:
                name = part.get("name") if isinstance(part, dict) else part
                raise _malformed(f"unknown operation part {name!r}", position)
            if part["name"] in by_name:
                raise _malformed(f"part {part['name']!r} given twice", position)
            by_name[part["name"]] = part
        if "type" not in by_name:
            raise _malformed("an operation needs a type", position)
        op_type = _string_part(by_name["type"], position)
        if op_type not in _REQUIRED_PARTS:
            raise _malformed(f"unknown operation type {op_type!r}", position)
        for required in _REQUIRED_PARTS[op_type]:
            if required not in by_name:
                raise _malformed(f"a {op_type} operation needs a {required!r} part", position)
        path = _string_part(by_name["path"], position)
        try:
            steps = _parse_path(path)
        except _PathError as exc:
            status = 400
            issue = "not-supported" if exc.code == "MSO-PATCH-014" else "invalid"
            raise FhirError(
                status,
                issue,
                f"FHIRPath Patch operation {position}: path {path!r}: {exc}",
                code=exc.code,
                expression=[f"Parameters.parameter[{position}]", path],
            ) from exc
        op = _Operation(position, op_type, path, steps)
        if op_type == "add":
            op.name = _string_part(by_name["name"], position)
        if op_type in ("add", "insert", "replace"):
            op.value = _parse_value(by_name["value"], position)
        if op_type == "insert":
            op.index = _integer_part(by_name["index"], position)
        if op_type == "move":
            op.source = _integer_part(by_name["source"], position)
            op.destination = _integer_part(by_name["destination"], position)
        operations.append(op)
    return operations


# --------------------------------------------------------------------------------------------
# FHIRPath Patch: applying operations
# --------------------------------------------------------------------------------------------


def apply_fhirpath_patch(resource: dict[str, Any], parameters: Any) -> dict[str, Any]:
    """Apply a FHIRPath Patch ``Parameters`` body to a copy of ``resource`` and return the copy.

    Operations run in order (http://hl7.org/fhir/R4/fhirpatch.html): ``add`` (path selects one
    element, ``name`` is the child to add — appended when repeating), ``insert`` (path selects a
    list, ``index`` 0..len), ``delete`` (path selects zero or one element), ``replace`` (path
    selects one element) and ``move`` (path selects a list, ``source`` and ``destination`` are
    indices). Raises :class:`FhirError` MSO-PATCH-004/011/012/013/014/015.
    """
    operations = _parse_operations(parameters)
    before = _identity(resource)
    doc = copy.deepcopy(resource)
    resolver = _Resolver(doc)
    for op in operations:
        try:
            _APPLY[op.type](resolver, op)
        except _PathError as exc:
            if exc.code == "MSO-PATCH-012":
                raise op.error(422, "processing", exc.code, str(exc)) from exc
            issue = "not-supported" if exc.code == "MSO-PATCH-014" else "invalid"
            raise op.error(400, issue, exc.code, str(exc)) from exc
        if _identity(doc) != before:
            raise op.error(
                422, "invariant", "MSO-PATCH-004", "a patch may not change resourceType or id"
            )
    _prune_empty(doc)
    return doc


def _exactly_one(nodes: list[_Node], op: _Operation) -> _Node:
    if len(nodes) != 1:
        found = "no element" if not nodes else f"{len(nodes)} elements"
        raise op.error(
            422, "processing", "MSO-PATCH-012", f"the path matched {found}; exactly one is required"
        )
    return nodes[0]


def _not_applicable(op: _Operation, detail: str) -> FhirError:
    return op.error(422, "processing", "MSO-PATCH-015", detail)


def _write_key(type_def: str | None, name: str, suffix: str | None, op: _Operation) -> str:
    """The JSON key for writing element ``name`` (with value type ``suffix``) into ``type_def``."""
    props = _properties(type_def)
    if props is None:
        return name
    if name in props and not name.startswith("_"):
        return name
    if suffix and name + suffix in props:
        return name + suffix
    variants = [k for k in props if _choice_base_of(k, name)]
    if variants and _is_choice(type_def, name):
        allowed = ", ".join(k[len(name) :] for k in variants)
        given = f"a {suffix} value" if suffix else "a value without a type"
        raise _not_applicable(op, f"{name}[x] cannot take {given}; allowed types are {allowed}")
    raise _not_applicable(op, f"{type_def} has no element {name!r}")


def _fit_value(value: _Value, type_def: str | None, op: _Operation) -> tuple[Any, Any]:
    """Convert an operation value to the JSON of an element of ``type_def``: (json, _extension)."""
    if value.parts is not None:
        result: Any = _object_from_parts(value.parts, type_def, op)
        extension = None
    else:
        result, extension = copy.deepcopy(value.json), copy.deepcopy(value.extension)
    complex_ = _is_complex_def(type_def)
    if type_def == "ResourceList" and not (
        isinstance(result, dict) and isinstance(result.get("resourceType"), str)
    ):
        raise _not_applicable(op, "the element takes a resource")
    if complex_ is True and not isinstance(result, dict):
        raise _not_applicable(op, f"a {type_def} element needs a complex value")
    if complex_ is False and isinstance(result, dict | list):
        raise _not_applicable(op, f"a {type_def} element needs a primitive value")
    return result, extension


def _object_from_parts(parts: list[dict[str, Any]], type_def: str | None, op: _Operation) -> Any:
    obj: dict[str, Any] = {}
    props = _properties(type_def)
    for part in parts:
        value = _parse_value(part, op.position)
        key = _write_key(type_def, part["name"], value.suffix, op)
        prop = props.get(key) if props else None
        child_def = _ref(prop) or _suffix_def(value.suffix if key != part["name"] else None)
        child, extension = _fit_value(value, child_def, op)
        if _is_array(prop) or key in obj:
            if key in obj and not isinstance(obj[key], list):
                obj[key] = [obj[key]]
                if "_" + key in obj:
                    obj["_" + key] = [obj["_" + key]]
            _append(obj, key, child, extension)
        else:
            obj[key] = child
            if extension is not None:
                obj["_" + key] = extension
    return obj


def _append(container: dict[str, Any], key: str, item: Any, extension: Any) -> None:
    """Append to a (possibly new) list, keeping a parallel ``_key`` list in step."""
    container.setdefault(key, []).append(item)
    _sync_extensions(container, key, lambda ext: ext.append(extension), extension, grown=1)


def _sync_extensions(
    container: dict[str, Any], key: str, change: Any, extension: Any, *, grown: int = 0
) -> None:
    """Apply ``change`` to the parallel ``_key`` list of primitive extensions.

    The list is created (all ``None``) when missing and ``extension`` is not None; ``grown`` says
    by how many items ``container[key]`` grew just before, so a new list starts at the old size.
    """
    ext_key = "_" + key
    items = container.get(key)
    extensions = container.get(ext_key)
    if not isinstance(extensions, list):
        if extension is None or not isinstance(items, list):
            return
        extensions = [None] * (len(items) - grown)
        container[ext_key] = extensions
    change(extensions)
    if isinstance(items, list):
        del extensions[len(items) :]
        extensions.extend([None] * (len(items) - len(extensions)))
    if all(e is None for e in extensions):
        del container[ext_key]


def _op_add(resolver: _Resolver, op: _Operation) -> None:
    assert op.name is not None and op.value is not None
    node = _exactly_one(resolver.select(op.steps), op)
    if not isinstance(node.value, dict):
        raise _not_applicable(op, "content can only be added to a complex element")
    target = node.value
    key = _write_key(node.type_def, op.name, op.value.suffix, op)
    props = _properties(node.type_def)
    prop = props.get(key) if props else None
    child_def = _ref(prop) or _suffix_def(op.value.suffix if key != op.name else None)
    item, extension = _fit_value(op.value, child_def, op)
    repeating = _is_array(prop) if props is not None else isinstance(target.get(key), list)
    if repeating:
        if key in target and not isinstance(target[key], list):
            raise _not_applicable(op, f"{key!r} holds a single value, not a list")
        _append(target, key, item, extension)
        return
    base = op.name if key != op.name else _choice_base(node.type_def, key)
    existing = [k for k in target if k == key or (base and _choice_base_of(k, base))]
    if existing:
        raise _not_applicable(
            op, f"{existing[0]!r} already has a value; use replace for a non-repeating element"
        )
    target[key] = item
    if extension is not None:
        target["_" + key] = extension


def _select_list(resolver: _Resolver, op: _Operation) -> tuple[dict[str, Any], str, str | None]:
    """The list an insert or move works on: (container, key, item type definition)."""
    last = op.steps[-1]
    if last.kind == "member":
        if len(op.steps) == 1 and last.name == resolver.root.get("resourceType"):
            raise _not_applicable(op, "the path must select a list, not the resource")
        parents = resolver.select(op.steps[:-1]) if len(op.steps) > 1 else [resolver.root_node()]
        parent = _exactly_one(parents, op)
        if not isinstance(parent.value, dict):
            raise _not_applicable(op, "the path does not select a list")
        key, _choice = _find_key(parent.value, parent.type_def, last.name)
        if key is None:
            key = _write_key(parent.type_def, last.name, None, op)
        props = _properties(parent.type_def)
        prop = props.get(key) if props else None
        current = parent.value.get(key)
        if (props is not None and not _is_array(prop)) or (
            current is not None and not isinstance(current, list)
        ):
            raise _not_applicable(op, f"{key!r} is not a repeating element")
        return parent.value, key, _ref(prop)
    nodes = resolver.select(op.steps)
    if not nodes:
        raise op.error(422, "processing", "MSO-PATCH-012", "the path matched no list")
    first = nodes[0]
    same_list = all(
        n.container is first.container and n.key == first.key and n.index is not None for n in nodes
    )
    if not same_list or first.container is None or first.key is None:
        raise _not_applicable(op, "the path does not select items of a single list")
    return first.container, first.key, first.type_def


def _op_insert(resolver: _Resolver, op: _Operation) -> None:
    assert op.value is not None and op.index is not None
    container, key, item_def = _select_list(resolver, op)
    size = len(container.get(key) or [])
    if not 0 <= op.index <= size:
        raise op.error(422, "processing", "MSO-PATCH-013", f"index {op.index} is outside 0..{size}")
    item, extension = _fit_value(op.value, item_def, op)
    index = op.index
    container.setdefault(key, []).insert(index, item)
    _sync_extensions(container, key, lambda ext: ext.insert(index, extension), extension, grown=1)


def _op_move(resolver: _Resolver, op: _Operation) -> None:
    assert op.source is not None and op.destination is not None
    container, key, _item_def = _select_list(resolver, op)
    items = container.get(key) or []
    size = len(items)
    for label, index in (("source", op.source), ("destination", op.destination)):
        if not 0 <= index < size:
            raise op.error(
                422,
                "processing",
                "MSO-PATCH-013",
                f"{label} index {index} is outside 0..{size - 1}"
                if size
                else f"{label} index {index}: the list is empty",
            )
    source, destination = op.source, op.destination

    def move(values: list[Any]) -> None:
        values.insert(destination, values.pop(source))

    move(items)
    _sync_extensions(container, key, move, None)


def _op_replace(resolver: _Resolver, op: _Operation) -> None:
    assert op.value is not None
    node = _exactly_one(resolver.select(op.steps), op)
    container, key = node.container, node.key
    if container is None or key is None:
        raise _not_applicable(op, "the resource itself cannot be replaced")
    props = _properties(node.parent_def)
    if node.choice and op.value.suffix and key != node.choice + op.value.suffix:
        new_key = _write_key(node.parent_def, node.choice, op.value.suffix, op)
        item_def = _ref(props.get(new_key) if props else None) or _suffix_def(op.value.suffix)
        item, extension = _fit_value(op.value, item_def, op)
        del container[key]
        container.pop("_" + key, None)
        container[new_key] = item
        if extension is not None:
            container["_" + new_key] = extension
        return
    item_def = _ref(props.get(key) if props else None) or node.type_def
    item, extension = _fit_value(op.value, item_def, op)
    if node.index is None:
        container[key] = item
        if extension is not None:
            container["_" + key] = extension
        else:
            container.pop("_" + key, None)
        return
    index = node.index
    container[key][index] = item

    def set_extension(values: list[Any]) -> None:
        values[index] = extension

    _sync_extensions(container, key, set_extension, extension)


def _op_delete(resolver: _Resolver, op: _Operation) -> None:
    nodes = resolver.select(op.steps)
    if not nodes:
        return
    node = _exactly_one(nodes, op)
    container, key = node.container, node.key
    if container is None or key is None:
        raise _not_applicable(op, "the resource itself cannot be deleted")
    if node.index is None:
        del container[key]
        container.pop("_" + key, None)
        return
    index = node.index
    container[key].pop(index)
    _sync_extensions(container, key, lambda ext: ext.pop(index), None)
    if not container[key]:
        del container[key]
        container.pop("_" + key, None)


_APPLY = {
    "add": _op_add,
    "insert": _op_insert,
    "delete": _op_delete,
    "replace": _op_replace,
    "move": _op_move,
}


def _prune_empty(value: Any) -> None:
    """Remove objects and arrays left empty (FHIR JSON has none); the root itself stays.

    Entries of ``_name`` arrays parallel to primitive arrays become ``None`` instead of being
    removed, so the two arrays stay aligned.
    """
    if isinstance(value, dict):
        for key in list(value):
            child = value[key]
            _prune_empty(child)
            if isinstance(child, list) and key.startswith("_"):
                child[:] = [None if isinstance(c, dict | list) and not c else c for c in child]
                if all(c is None for c in child):
                    child.clear()
            if isinstance(child, dict | list) and not child:
                del value[key]
    elif isinstance(value, list):
        for child in value:
            _prune_empty(child)
        value[:] = [c for c in value if not (isinstance(c, dict | list) and not c)]
