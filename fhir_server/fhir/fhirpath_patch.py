"""FHIRPath Patch: a ``Parameters`` resource of operations applied to a resource.

http://hl7.org/fhir/R4/fhirpatch.html. Each operation's path is resolved to element locations by
:mod:`fhir_server.fhir.patch_paths`; element names, cardinalities, choice variants and whether a
value must be complex or primitive come from the shared type model
(:mod:`fhir_server.fhir.model`). Error codes are listed in :mod:`fhir_server.fhir.patch`.

Values are converted to the JSON of the target element: ``valueX`` gives its JSON as is
(``_valueX`` becomes the primitive's ``_name`` extension), ``resource`` gives a resource (for
``contained``), and a nested ``part`` list gives an object built recursively (repeated part
names, or a part for a repeating element, become arrays). Choice elements take their JSON name
from the value's type: ``add`` with ``name`` ``deceased`` and ``valueBoolean`` writes
``deceasedBoolean``; ``replace`` of ``Patient.deceased`` with a ``valueDateTime`` swaps
``deceasedBoolean`` for ``deceasedDateTime``. Primitive arrays keep their parallel ``_name``
arrays in step. Objects or arrays left empty by a FHIRPath Patch are removed, as FHIR JSON forbids
them.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from fhir_server.fhir.model import RESOURCE, model
from fhir_server.fhir.outcome import FhirError
from fhir_server.fhir.patch_identity import identity
from fhir_server.fhir.patch_paths import (
    Node,
    PathError,
    Resolver,
    Step,
    choice_keys,
    choice_slot,
    find_key,
    is_complex,
    is_known,
    item_type,
    parse_path,
    slot_of,
)

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
    steps: tuple[Step, ...]
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


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")


def _label(name: Any) -> str:
    """A part or operation name for a message: quoted when it is a plain name, else withheld."""
    return repr(name) if isinstance(name, str) and _NAME.fullmatch(name) else "(not a name)"


def _value_keys(part: dict[str, Any]) -> list[str]:
    return [k for k in part if k.startswith("value") and len(k) > 5 and k[5].isupper()]


def _parse_value(part: dict[str, Any], position: int, depth: int = 0) -> _Value:
    """Read a ``value`` part: exactly one of ``valueX``, ``resource`` or a nested ``part`` list."""
    keys = _value_keys(part)
    present = len(keys) + ("resource" in part) + ("part" in part)
    if present != 1:
        raise _malformed(
            f"part {_label(part.get('name'))} needs exactly one of value[x], resource or part",
            position,
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
        raise _malformed(
            f"part {_label(part.get('name'))} has an empty or invalid part list", position
        )
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
    raise _malformed(
        f"part {_label(part.get('name'))} must have a valueString or valueCode", position
    )


def _integer_part(part: dict[str, Any], position: int) -> int:
    for key in _INTEGER_KEYS:
        if key in part:
            value = part[key]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    raise _malformed(f"part {_label(part.get('name'))} must have a valueInteger", position)


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
            name = part.get("name") if isinstance(part, dict) else None
            if not isinstance(name, str) or name not in _PART_NAMES:
                raise _malformed(f"unknown operation part {_label(name)}", position)
            if part["name"] in by_name:
                raise _malformed(f"part {part['name']!r} given twice", position)
            by_name[part["name"]] = part
        if "type" not in by_name:
            raise _malformed("an operation needs a type", position)
        op_type = _string_part(by_name["type"], position)
        if op_type not in _REQUIRED_PARTS:
            raise _malformed(
                f"unknown operation type {_label(op_type)}: one of " + ", ".join(_REQUIRED_PARTS),
                position,
            )
        for required in _REQUIRED_PARTS[op_type]:
            if required not in by_name:
                raise _malformed(f"a {op_type} operation needs a {required!r} part", position)
        path = _string_part(by_name["path"], position)
        try:
            steps = parse_path(path)
        except PathError as exc:
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
    before = identity(resource)
    doc = copy.deepcopy(resource)
    resolver = Resolver(doc)
    for op in operations:
        try:
            _APPLY[op.type](resolver, op)
        except PathError as exc:
            if exc.code == "MSO-PATCH-012":
                raise op.error(422, "processing", exc.code, str(exc)) from exc
            issue = "not-supported" if exc.code == "MSO-PATCH-014" else "invalid"
            raise op.error(400, issue, exc.code, str(exc)) from exc
        if identity(doc) != before:
            raise op.error(
                422, "invariant", "MSO-PATCH-004", "a patch may not change resourceType or id"
            )
    _prune_empty(doc)
    return doc


def _exactly_one(nodes: list[Node], op: _Operation) -> Node:
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
    if not is_known(type_def):
        return name
    assert type_def is not None
    info = model().info(type_def)
    assert info is not None
    if name in info.slots and not name.startswith("_"):
        return name
    element = info.elements.get(name)
    if element is not None and element.choice:
        if suffix and name + suffix in info.slots:
            return name + suffix
        allowed = ", ".join(t[:1].upper() + t[1:] for t in element.types)
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
    complex_ = is_complex(type_def)
    if (
        type_def is not None
        and model().kind(type_def) == RESOURCE
        and not (isinstance(result, dict) and isinstance(result.get("resourceType"), str))
    ):
        raise _not_applicable(op, "the element takes a resource")
    if complex_ is True and not isinstance(result, dict):
        raise _not_applicable(op, f"a {type_def} element needs a complex value")
    if complex_ is False and isinstance(result, dict | list):
        raise _not_applicable(op, f"a {type_def} element needs a primitive value")
    return result, extension


def _object_from_parts(parts: list[dict[str, Any]], type_def: str | None, op: _Operation) -> Any:
    obj: dict[str, Any] = {}
    for part in parts:
        value = _parse_value(part, op.position)
        key = _write_key(type_def, part["name"], value.suffix, op)
        slot = slot_of(type_def, key)
        child, extension = _fit_value(value, item_type(slot), op)
        if (slot is not None and slot.element.many) or key in obj:
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


def _op_add(resolver: Resolver, op: _Operation) -> None:
    assert op.name is not None and op.value is not None
    node = _exactly_one(resolver.select(op.steps), op)
    if not isinstance(node.value, dict):
        raise _not_applicable(op, "content can only be added to a complex element")
    target = node.value
    key = _write_key(node.type_def, op.name, op.value.suffix, op)
    slot = slot_of(node.type_def, key)
    item, extension = _fit_value(op.value, item_type(slot), op)
    repeating = (
        slot.element.many
        if is_known(node.type_def) and slot is not None
        else isinstance(target.get(key), list)
    )
    if repeating:
        if key in target and not isinstance(target[key], list):
            raise _not_applicable(op, f"{key!r} holds a single value, not a list")
        _append(target, key, item, extension)
        return
    choice = choice_slot(node.type_def, key)
    variants = choice_keys(node.type_def, choice.element.name, target) if choice else []
    existing = [k for k in target if k == key or k in variants]
    if existing:
        raise _not_applicable(
            op, f"{existing[0]!r} already has a value; use replace for a non-repeating element"
        )
    target[key] = item
    if extension is not None:
        target["_" + key] = extension


def _select_list(resolver: Resolver, op: _Operation) -> tuple[dict[str, Any], str, str | None]:
    """The list an insert or move works on: (container, key, item type key)."""
    last = op.steps[-1]
    if last.kind == "member":
        if len(op.steps) == 1 and last.name == resolver.root.get("resourceType"):
            raise _not_applicable(op, "the path must select a list, not the resource")
        parents = resolver.select(op.steps[:-1]) if len(op.steps) > 1 else [resolver.root_node()]
        parent = _exactly_one(parents, op)
        if not isinstance(parent.value, dict):
            raise _not_applicable(op, "the path does not select a list")
        key, _choice = find_key(parent.value, parent.type_def, last.name)
        if key is None:
            key = _write_key(parent.type_def, last.name, None, op)
        slot = slot_of(parent.type_def, key)
        current = parent.value.get(key)
        if (is_known(parent.type_def) and (slot is None or not slot.element.many)) or (
            current is not None and not isinstance(current, list)
        ):
            raise _not_applicable(op, f"{key!r} is not a repeating element")
        return parent.value, key, item_type(slot)
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


def _op_insert(resolver: Resolver, op: _Operation) -> None:
    assert op.value is not None and op.index is not None
    container, key, item_def = _select_list(resolver, op)
    size = len(container.get(key) or [])
    if not 0 <= op.index <= size:
        raise op.error(422, "processing", "MSO-PATCH-013", f"index {op.index} is outside 0..{size}")
    item, extension = _fit_value(op.value, item_def, op)
    index = op.index
    container.setdefault(key, []).insert(index, item)
    _sync_extensions(container, key, lambda ext: ext.insert(index, extension), extension, grown=1)


def _op_move(resolver: Resolver, op: _Operation) -> None:
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


def _op_replace(resolver: Resolver, op: _Operation) -> None:
    assert op.value is not None
    node = _exactly_one(resolver.select(op.steps), op)
    container, key = node.container, node.key
    if container is None or key is None:
        raise _not_applicable(op, "the resource itself cannot be replaced")
    if node.choice and op.value.suffix and key != node.choice + op.value.suffix:
        new_key = _write_key(node.parent_def, node.choice, op.value.suffix, op)
        item_def = item_type(slot_of(node.parent_def, new_key)) or model().type_of_suffix(
            op.value.suffix
        )
        item, extension = _fit_value(op.value, item_def, op)
        del container[key]
        container.pop("_" + key, None)
        container[new_key] = item
        if extension is not None:
            container["_" + new_key] = extension
        return
    item_def = item_type(slot_of(node.parent_def, key)) or node.type_def
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


def _op_delete(resolver: Resolver, op: _Operation) -> None:
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
