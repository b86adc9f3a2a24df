"""The kick-off request of a Bulk Data export, parsed and checked
(https://hl7.org/fhir/uv/bulkdata/STU3/export.html#query-parameters).

:func:`parse_kickoff` turns the parameters of ``GET`` (query) or ``POST`` (a ``Parameters``
body) into an :class:`ExportRequest`, the form a job stores and a worker runs. A parameter
the server cannot honour is a 400 with a stable code, unless the client sent
``Prefer: handling=lenient``: then it is dropped and named in :attr:`ExportRequest.ignored`
(the spec's lenient handling). Which types a caller may export (its scopes) is checked by
the kick-off operation, which knows the caller.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from fhir_server.fhir.outcome import FhirError
from fhir_server.search.query import parse_query
from fhir_server.search.registry import SearchRegistry

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({NDJSON, "application/ndjson", "ndjson"})
PROVENANCE = "RelevantProvenanceResources"
LEVELS = ("system", "patient", "group")
# kick-off parameters of the IG, and whether each may repeat
_KNOWN = frozenset(
    {
        "_outputFormat",
        "_since",
        "_until",
        "_type",
        "_elements",
        "_typeFilter",
        "patient",
        "includeAssociatedData",
        "organizeOutputBy",
        "allowPartialManifests",
    }
)
_TRANSPORT = frozenset({"_format", "_pretty"})
# where one _typeFilter ends and the next begins in a comma-separated value (STU2 form)
_FILTER_START = re.compile(r",(?=[A-Z][A-Za-z]*\?)")
_ELEMENT = re.compile(r"^(?:[A-Z][A-Za-z]*\.)?[a-z][A-Za-z0-9]*(?:\[x\])?$")
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})$")


@dataclass(slots=True)
class ExportRequest:
    """One export as a worker runs it.

    ``level`` is ``system``, ``patient`` or ``group`` (``group_id`` then names the Group);
    ``types`` the ``_type`` list (``None``: every type the caller may read);
    ``type_filters`` per type the searches (each a parameter list) whose union is exported;
    ``patients`` restricts a Patient or Group export to these patient ids; ``since`` /
    ``until`` bound ``meta.lastUpdated``; ``elements`` is ``_elements``; ``provenance`` asks
    for the Provenance of the exported resources (``includeAssociatedData``). ``ignored``
    names what lenient handling dropped.
    """

    level: str = "system"
    group_id: str | None = None
    types: list[str] | None = None
    type_filters: dict[str, list[list[tuple[str, str]]]] = field(default_factory=dict)
    since: str | None = None
    until: str | None = None
    elements: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    provenance: bool = False
    output_format: str = NDJSON
    ignored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (the job row's ``request``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportRequest:
        """The request :meth:`to_dict` saved."""
        data = dict(data)
        data["type_filters"] = {
            t: [[(k, v) for k, v in params] for params in filters]
            for t, filters in (data.get("type_filters") or {}).items()
        }
        return cls(**data)


def bulk_error(status: int, message: str, code: str, expression: str | None = None) -> FhirError:
    """An OperationOutcome error of the export (``MSO-BULK-NNN``)."""
    issue = {403: "forbidden", 404: "not-found", 429: "throttled"}.get(status, "invalid")
    if code.endswith(("002", "009", "010")):
        issue = "not-supported"
    return FhirError(
        status, issue, message, code=code, expression=[expression] if expression else None
    )


def parse_kickoff(
    registry: SearchRegistry,
    *,
    level: str,
    group_id: str | None,
    params: list[tuple[str, str]],
    body: dict[str, Any] | None,
    method: str,
    respond_async: bool,
    lenient: bool,
) -> ExportRequest:
    """The :class:`ExportRequest` of a kick-off; 400 for what cannot be honoured (see the
    module docstring for lenient handling)."""
    if not respond_async:
        raise bulk_error(
            400,
            "A bulk export must be asked for asynchronously: send 'Prefer: respond-async'",
            "MSO-BULK-001",
        )
    request = ExportRequest(level=level, group_id=group_id)
    pairs = _pairs(params, body, method)

    def drop(name: str, message: str, code: str) -> None:
        if not lenient:
            raise bulk_error(400, message, code, name)
        request.ignored.append(name)

    values: dict[str, list[str]] = {}
    for name, value in pairs:
        if name not in _KNOWN:
            drop(name, f"The export parameter '{name}' is not supported", "MSO-BULK-002")
            continue
        values.setdefault(name, []).append(value)
    _output_format(values, request)
    request.since = _instant(values, "_since")
    request.until = _instant(values, "_until")
    _types(registry, values, request, drop)
    _type_filters(registry, values, request, drop)
    _elements(values, request)
    _patients(values, request, level, method)
    for name in values.get("organizeOutputBy", []):
        if name:
            drop(
                "organizeOutputBy",
                "organizeOutputBy is not supported: output files hold one resource type each",
                "MSO-BULK-009",
            )
    for text in values.get("includeAssociatedData", []):
        for code in (c.strip() for c in text.split(",") if c.strip()):
            if code == PROVENANCE:
                request.provenance = True
            else:
                drop(
                    "includeAssociatedData",
                    f"includeAssociatedData '{code}' is not supported (only {PROVENANCE})",
                    "MSO-BULK-010",
                )
    for text in values.get("allowPartialManifests", []):
        if text.lower() not in ("true", "false"):
            raise bulk_error(
                400, "allowPartialManifests must be true or false", "MSO-BULK-011",
                "allowPartialManifests",
            )  # fmt: skip
    return request


def _pairs(
    params: list[tuple[str, str]], body: dict[str, Any] | None, method: str
) -> list[tuple[str, str]]:
    """The parameters as name/value text pairs, from the query (GET) or the body (POST)."""
    if method != "POST" or body is None:
        return [(k, v) for k, v in params if k not in _TRANSPORT]
    if body.get("resourceType") != "Parameters":
        raise bulk_error(400, "A POST kick-off carries a Parameters resource", "MSO-BULK-012")
    pairs: list[tuple[str, str]] = [(k, v) for k, v in params if k not in _TRANSPORT]
    for param in body.get("parameter") or []:
        name = param.get("name") or ""
        value = _param_value(param)
        if value is None:
            raise bulk_error(
                400, f"The parameter '{name}' has no value of a supported type", "MSO-BULK-012",
                name,
            )  # fmt: skip
        pairs.append((name, value))
    return pairs


def _param_value(param: dict[str, Any]) -> str | None:
    for key, value in param.items():
        if not key.startswith("value"):
            continue
        if key == "valueReference":
            return str((value or {}).get("reference") or "")
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
    return None


def _output_format(values: dict[str, list[str]], request: ExportRequest) -> None:
    formats = values.get("_outputFormat", [])
    for value in formats:
        if value not in OUTPUT_FORMATS:
            raise bulk_error(
                400,
                "_outputFormat must be application/fhir+ndjson (or application/ndjson, ndjson)",
                "MSO-BULK-003",
                "_outputFormat",
            )


def _instant(values: dict[str, list[str]], name: str) -> str | None:
    given = values.get(name, [])
    if not given:
        return None
    if len(given) > 1:
        raise bulk_error(400, f"{name} may be given once", "MSO-BULK-004", name)
    text = given[0]
    if not _INSTANT.match(text):
        raise bulk_error(
            400, f"{name} must be a FHIR instant with a time zone", "MSO-BULK-004", name
        )
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise bulk_error(400, f"{name} is not a valid instant", "MSO-BULK-004", name) from None
    return text


def _types(
    registry: SearchRegistry, values: dict[str, list[str]], request: ExportRequest, drop: Any
) -> None:
    if "_type" not in values:
        return
    types: list[str] = []
    for text in values["_type"]:
        for name in (t.strip() for t in text.split(",") if t.strip()):
            if name not in registry.resource_types:
                drop("_type", f"_type names an unknown resource type '{name}'", "MSO-BULK-005")
            elif name not in types:
                types.append(name)
    request.types = types


def _type_filters(
    registry: SearchRegistry, values: dict[str, list[str]], request: ExportRequest, drop: Any
) -> None:
    for text in values.get("_typeFilter", []):
        for item in _FILTER_START.split(text):
            rtype, sep, query = item.partition("?")
            if not sep or rtype not in registry.resource_types:
                raise bulk_error(
                    400,
                    "_typeFilter must be a resource type, '?' and search parameters",
                    "MSO-BULK-006",
                    "_typeFilter",
                )
            if request.types is not None and rtype not in request.types:
                drop("_typeFilter", f"_typeFilter names {rtype}, not in _type", "MSO-BULK-006")
                continue
            params = parse_qsl(query, keep_blank_values=True)
            parsed = parse_query(registry, (rtype,), params)
            bad = parsed.issues
            if bad or parsed.includes or not params:
                raise bulk_error(
                    400,
                    f"_typeFilter for {rtype} is not a search this server can run: "
                    + (bad[0].message if bad else "no criteria, or _include"),
                    "MSO-BULK-006",
                    "_typeFilter",
                )
            request.type_filters.setdefault(rtype, []).append(list(params))


def _elements(values: dict[str, list[str]], request: ExportRequest) -> None:
    for text in values.get("_elements", []):
        for name in (e.strip() for e in text.split(",") if e.strip()):
            if not _ELEMENT.match(name):
                raise bulk_error(
                    400,
                    "_elements entries are element names, optionally prefixed with a type",
                    "MSO-BULK-008",
                    "_elements",
                )
            if name not in request.elements:
                request.elements.append(name)


def _patients(
    values: dict[str, list[str]], request: ExportRequest, level: str, method: str
) -> None:
    refs = values.get("patient", [])
    if not refs:
        return
    if method != "POST":
        raise bulk_error(
            400, "The patient parameter is only accepted in a POST kick-off", "MSO-BULK-007",
            "patient",
        )  # fmt: skip
    if level == "system":
        raise bulk_error(
            400, "The patient parameter applies to Patient and Group exports", "MSO-BULK-007",
            "patient",
        )  # fmt: skip
    for ref in refs:
        rtype, _, rid = ref.partition("/")
        if rtype != "Patient" or not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", rid):
            raise bulk_error(
                400, "patient must reference a Patient (Patient/<id>)", "MSO-BULK-007", "patient"
            )
        if rid not in request.patients:
            request.patients.append(rid)
