"""Derive the compact definition files in ``fhir/r4/`` from the official HL7 R4 definitions.

Usage::

    python -m fhir_server.fhir.build_definitions /work/shared/fhir-r4 [output-dir]

Inputs (HL7 FHIR R4 4.0.1, CC0): ``profiles-resources.json`` and ``profiles-types.json`` (the
StructureDefinitions with snapshots, http://hl7.org/fhir/R4/structuredefinition.html) and
``fhir.schema.json`` (http://hl7.org/fhir/R4/json.html#schema). Outputs, never edited by hand:

``resource-types.json``
    The concrete resource types: StructureDefinitions with ``kind = resource``,
    ``derivation = specialization`` and ``abstract = false``, sorted, one per line.

``elements.json``
    What :mod:`fhir_server.fhir.validation` walks (http://hl7.org/fhir/R4/validation.html)::

        {"fhirVersion": "4.0.1",
         "bases": {"Patient": "DomainResource", "Age": "Quantity", "code": "string", ...},
         "primitives": {"date": {"json": "string", "regex": "..."},
                        "integer": {"json": "number", "regex": "...", "min": -2147483648, ...}},
         "types": {"Patient": {"gender": {"min": 0, "max": "1", "types": ["code"],
                                          "codes": ["male", "female", "other", "unknown"]}, ...},
                   "Patient.contact": {...},
                   "Questionnaire.item": {"item": {"min": 0, "max": "*",
                                                   "ref": "Questionnaire.item"}, ...},
                   "HumanName": {...}, "Element": {...}, ...}}

    ``types`` has one entry per resource type, complex data type and element with children
    (backbone elements such as ``Patient.contact``, also ``Timing.repeat``), mapping each child
    element name (choice elements keep their ``[x]`` name) to ``min``, ``max``, ``types`` (FHIR
    type codes; the ``System.String`` of ``id``/``url`` elements resolved through the
    ``structuredefinition-fhir-type`` extension), ``ref`` (the ``contentReference`` target, for
    elements that reuse another element's children), ``targets`` (the resource types a
    ``Reference`` may point to; absent when any type is allowed) and ``codes`` (the allowed codes
    of a required binding, as ``fhir.schema.json`` enumerates them). ``primitives`` gives each
    primitive type's JSON type and regex from ``fhir.schema.json``, and the numeric range from the
    StructureDefinition (inherited along ``baseDefinition``). ``bases`` maps every type (primitive,
    complex, resource, abstract) to the type its ``baseDefinition`` names (FHIRPath ``is`` /
    ``ofType`` follow it); ``Element`` and ``Resource`` have none.

The files these are taken from are HL7's as redistributed by Medplum, which changed both a
little: snapshot elements of its own (``Meta.project``, ``Meta.author`` …,
``ObservationDefinition.publisher``: unlike every element HL7's generator emits they carry no
``isModifier``, and are left out), R5 elements in a few snapshots (``ResearchStudy.name``,
``EvidenceVariable.characteristic.definitionByTypeAndValue`` …) and Medplum properties in the
schema (``OperationOutcome.status``, ``Reference.resource`` …). So where the schema defines a
type, an element is kept only when both files have it (see :func:`reconcile_with_schema`); the
schema's Medplum-only definitions are never read. ``SubscriptionStatus`` (an R4B resource,
``fhirVersion`` 4.3.0, that the redistribution adds) has no schema definition and is taken from
its snapshot as is; it is one of the 147 types the selection rule above yields.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

OUTPUT_DIR = Path(__file__).with_name("r4")
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
SD_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
SYSTEM_PREFIX = "http://hl7.org/fhirpath/System."


def _load(path: Path) -> Any:
    with path.open("rb") as fh:
        return json.load(fh)


def _structure_definitions(bundle: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "StructureDefinition":
            yield resource


def concrete_resource_types(resources_bundle: dict[str, Any]) -> list[str]:
    """The concrete resource type names of ``profiles-resources.json``, sorted."""
    return sorted(
        sd["type"]
        for sd in _structure_definitions(resources_bundle)
        if sd.get("kind") == "resource"
        and sd.get("derivation") == "specialization"
        and not sd.get("abstract", False)
    )


def _type_code(type_ref: dict[str, Any]) -> str:
    """The FHIR type code of an ElementDefinition.type, resolving FHIRPath System types."""
    code: str = type_ref["code"]
    if code.startswith(SYSTEM_PREFIX):
        for ext in type_ref.get("extension", []):
            if ext.get("url") == FHIR_TYPE_EXT:
                return str(ext["valueUrl"])
    return code


def _element_entry(element: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"min": element["min"], "max": element["max"]}
    if "contentReference" in element:
        entry["ref"] = element["contentReference"].lstrip("#")
        return entry
    types: list[str] = []
    targets: set[str] = set()
    for type_ref in element.get("type", []):
        code = _type_code(type_ref)
        if code not in types:
            types.append(code)
        if code == "Reference":
            profiles = type_ref.get("targetProfile") or [SD_PREFIX + "Resource"]
            targets.update(p.rsplit("/", 1)[-1] for p in profiles)
    entry["types"] = types
    if targets and "Resource" not in targets:
        entry["targets"] = sorted(targets)
    return entry


def element_tree(
    sds: Iterable[dict[str, Any]], view: str = "snapshot"
) -> dict[str, dict[str, dict[str, Any]]]:
    """Map each type name / element path with children to its child elements.

    From the snapshots, elements without ``isModifier`` (additions of the redistribution, see the
    module docstring) are left out; differentials are only read to restore elements the
    redistribution dropped from a snapshot.
    """
    tree: dict[str, dict[str, dict[str, Any]]] = {}
    for sd in sds:
        root = sd["type"]
        tree.setdefault(root, {})
        for element in sd.get(view, {}).get("element", []):
            path: str = element["path"]
            if path == root or "min" not in element or "max" not in element:
                continue
            if view == "snapshot" and "isModifier" not in element:
                continue
            if "type" not in element and "contentReference" not in element:
                continue
            parent, name = path.rsplit(".", 1)
            tree.setdefault(parent, {})[name] = _element_entry(element)
    return tree


def _schema_ref(prop: dict[str, Any]) -> str | None:
    ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _choice_key(base: str, type_code: str) -> str:
    return base + type_code[0].upper() + type_code[1:]


def reconcile_with_schema(
    tree: dict[str, dict[str, dict[str, Any]]],
    differential: dict[str, dict[str, dict[str, Any]]],
    schema: dict[str, Any],
    primitives: Iterable[str],
) -> None:
    """Align the element tree with ``fhir.schema.json`` where the schema defines the type.

    The two files were both touched by the redistribution, in different places (R5 elements in
    a few snapshots, Medplum elements in the schema), so an element is kept when both list it:
    snapshot elements the schema lacks are dropped, choice types keep the variants the schema
    has, elements the schema has but the snapshot lost are restored from the differential, and
    a plain element named like a variant of a choice element (an R5 split of an R4 choice) goes.
    The schema also contributes the enumerations of required bindings (``codes``) and the
    primitive type where the snapshot is looser (``Resource.id`` is ``id``, not ``string``).
    """
    definitions = schema["definitions"]
    primitive_names = set(primitives)
    roots = [name for name in tree if "." not in name and name in definitions]
    stack = [(name, name) for name in roots]
    visited: set[str] = set()
    while stack:
        def_name, path = stack.pop()
        if path in visited:
            continue
        visited.add(path)
        props = definitions[def_name].get("properties", {})
        children = tree.setdefault(path, {})
        for name, entry in differential.get(path, {}).items():
            if name not in children and (
                name in props or (name.endswith("[x]") and "types" in entry)
            ):
                children[name] = entry
                child_path = f"{path}.{name}"
                if child_path in differential and child_path not in tree:
                    tree[child_path] = dict(differential[child_path])
        for name, element in list(children.items()):
            if name.endswith("[x]"):
                kept = [t for t in element["types"] if _choice_key(name[:-3], t) in props]
                if kept:
                    element["types"] = kept
                else:
                    del children[name]
                continue
            prop = props.get(name)
            if prop is None:
                del children[name]
                continue
            codes = prop.get("enum") or prop.get("items", {}).get("enum")
            if codes:
                element["codes"] = list(codes)
            target = _schema_ref(prop)
            types = element.get("types", [])
            if (
                len(types) == 1
                and types[0] in primitive_names
                and target in primitive_names
                and target != types[0]
            ):
                element["types"] = [target]
            child_path = f"{path}.{name}"
            if child_path in tree and target in definitions:
                stack.append((target, child_path))
        for name, element in list(children.items()):
            if name.endswith("[x]"):
                for type_code in element["types"]:
                    children.pop(_choice_key(name[:-3], type_code), None)
    schema_roots = set(roots)
    for key in [k for k in tree if "." in k]:
        if key.split(".", 1)[0] in schema_roots and key not in visited:
            del tree[key]


def primitive_types(
    type_sds: Sequence[dict[str, Any]], schema: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each primitive type's JSON type and regex (schema) and numeric range (profiles)."""
    definitions = schema["definitions"]
    by_url = {sd["url"]: sd for sd in type_sds}
    out: dict[str, dict[str, Any]] = {}
    for sd in type_sds:
        if sd.get("kind") != "primitive-type":
            continue
        name = sd["type"]
        schema_def = definitions.get(name, {})
        info: dict[str, Any] = {"json": schema_def.get("type", "string")}
        if "pattern" in schema_def and info["json"] != "boolean":
            info["regex"] = schema_def["pattern"]
        current: dict[str, Any] | None = sd
        while current is not None and ("min" not in info or "max" not in info):
            for element in current["snapshot"]["element"]:
                if element["path"].endswith(".value"):
                    if "minValueInteger" in element:
                        info.setdefault("min", element["minValueInteger"])
                    if "maxValueInteger" in element:
                        info.setdefault("max", element["maxValueInteger"])
            current = by_url.get(current.get("baseDefinition", ""))
        out[name] = info
    return out


def base_types(sds: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Each specialization's base type name (``Patient`` -> ``DomainResource``), sorted by name."""
    bases: dict[str, str] = {}
    for sd in sds:
        base = sd.get("baseDefinition", "")
        if sd.get("derivation") == "constraint" or not base.startswith(SD_PREFIX):
            continue
        bases[sd["type"]] = base.removeprefix(SD_PREFIX)
    return dict(sorted(bases.items()))


def build(source: Path) -> tuple[list[str], dict[str, Any]]:
    """Compute the contents of ``resource-types.json`` and ``elements.json``."""
    resources = _load(source / "profiles-resources.json")
    types = _load(source / "profiles-types.json")
    schema = _load(source / "fhir.schema.json")
    resource_types = concrete_resource_types(resources)
    wanted_resources = set(resource_types)
    resource_sds = [
        sd for sd in _structure_definitions(resources) if sd["type"] in wanted_resources
    ]
    type_sds = list(_structure_definitions(types))
    complex_sds = [
        sd
        for sd in type_sds
        if sd.get("kind") == "complex-type" and sd.get("derivation") != "constraint"
    ]
    structures = [*complex_sds, *resource_sds]
    tree = element_tree(structures)
    primitives = primitive_types(type_sds, schema)
    reconcile_with_schema(tree, element_tree(structures, "differential"), schema, primitives)
    all_resource_sds = [
        sd for sd in _structure_definitions(resources) if sd.get("kind") == "resource"
    ]
    elements = {
        "fhirVersion": type_sds[0]["fhirVersion"],
        "bases": base_types([*type_sds, *all_resource_sds]),
        "primitives": primitives,
        "types": tree,
    }
    return resource_types, elements


def _dump_lines(mapping: dict[str, Any]) -> str:
    """A JSON object with one compact line per key (small diffs, small files)."""
    lines = [
        f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'), ensure_ascii=False)}"
        for key, value in mapping.items()
    ]
    return "{\n" + ",\n".join(lines) + "\n}"


def write(resource_types: list[str], elements: dict[str, Any], out_dir: Path) -> None:
    """Write both files into ``out_dir``."""
    (out_dir / "resource-types.json").write_text(
        "[\n" + ",\n".join(json.dumps(name) for name in resource_types) + "\n]", encoding="utf-8"
    )
    body = (
        "{\n"
        f'"fhirVersion": {json.dumps(elements["fhirVersion"])},\n'
        f'"bases": {json.dumps(elements["bases"], separators=(",", ":"))},\n'
        f'"primitives": {_dump_lines(elements["primitives"])},\n'
        f'"types": {_dump_lines(elements["types"])}\n'
        "}\n"
    )
    (out_dir / "elements.json").write_text(body, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="directory with the HL7 R4 definition files")
    parser.add_argument("out", type=Path, nargs="?", default=OUTPUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    resource_types, elements = build(args.source)
    write(resource_types, elements, args.out)
    print(
        f"{len(resource_types)} resource types, {len(elements['types'])} element groups, "
        f"{len(elements['primitives'])} primitive types -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
