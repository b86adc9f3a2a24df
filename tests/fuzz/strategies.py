"""Hypothesis strategies for hostile FHIR requests, derived from the server's own tables.

URL templates come from the route table (:data:`fhir_server.interactions.table.ROUTES`) and
operation names from the operation catalog, so a new route or operation is fuzzed without a
change here. Every strategy builds a :class:`FuzzRequest`: already percent-encoded path and
query (so NUL bytes, invalid UTF-8 and ``%2F`` reach the server as a client could send them),
raw body bytes and header values.

Writes are kept from touching other tests' data (they share the session database): every
conditional update, patch or delete carries ``_id=<a fresh id>`` (criteria are ANDed, so it
matches nothing), and transaction entries only delete by fresh ids.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import quote_from_bytes

from hypothesis import strategies as st

from fhir_server.interactions.operations.catalog import all_operations
from fhir_server.interactions.table import Route

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A few real types (those the MSO workflow uses, the audit trail's, Binary's raw path) and
# names no R4 type has.
TYPES = (
    "Patient",
    "Task",
    "ServiceRequest",
    "Observation",
    "Communication",
    "DocumentReference",
    "Invoice",
    "Organization",
    "PractitionerRole",
    "Consent",
    "AuditEvent",
    "Binary",
    "Provenance",
    "Bundle",
)
AUTH_KINDS = (
    "system",
    "admin",
    "requester",
    "provider",
    "patient",
    "none",
    "forged",
    "tampered",
    "garbage",
)
RESULT_PARAMS = (
    "_count",
    "_sort",
    "_include",
    "_revinclude",
    "_summary",
    "_elements",
    "_total",
    "_cursor",
    "_contained",
    "_id",
    "_lastUpdated",
    "_tag",
    "_profile",
    "_security",
    "_has",
    "_type",
    "_text",
    "_content",
    "_filter",
    "_format",
    "_pretty",
    "_page",
    "_since",
    "_at",
    "_list",
)
COMMON_PARAMS = (
    "name",
    "family",
    "identifier",
    "subject",
    "patient",
    "status",
    "code",
    "date",
    "focus",
    "owner",
    "requester",
    "birthdate",
    "gender",
    "value-quantity",
    "authored-on",
    "address",
    "agent",
    "altid",
    "entity",
    "outcome",
)
MODIFIERS = (
    "exact",
    "contains",
    "missing",
    "not",
    "text",
    "above",
    "below",
    "in",
    "not-in",
    "of-type",
    "identifier",
    "Patient",
    "iterate",
    "",
    "x" * 40,
)
PREFIXES = ("", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", "zz")


@dataclass
class FuzzRequest:
    """One request as sent: ``path`` and ``query`` are percent-encoded already."""

    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    auth: str = "system"

    def url(self) -> str:
        """The request's URL below the test client's base."""
        return f"/fhir/{self.path}" + (f"?{self.query}" if self.query else "")

    def describe(self) -> str:
        """The request in one line, for a failure message (the body cut to its head)."""
        body = "" if self.body is None else f" body={self.body[:300]!r}"
        return f"{self.method} {self.url()[:600]} auth={self.auth} headers={self.headers!r}{body}"


def fresh_id() -> str:
    """An id no resource has (a fresh one per call)."""
    return f"fz{uuid.uuid4().hex}"


def encode(raw: bytes | str) -> str:
    """Percent-encode every reserved byte, dots too (so ``.``/``..`` stay a literal segment)."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    return quote_from_bytes(data, safe="").replace(".", "%2E")


# -- scalar pieces ------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_hostile_text = st.one_of(
    _text,
    _printable,
    st.sampled_from(
        [
            "",
            "\x00",
            "a\x00b",
            "%00",
            "'; DROP TABLE resource; --",
            "\\",
            ",",
            "a,b,c",
            "a\\,b",
            "$",
            "|",
            "||",
            "*",
            "%",
            "_",
            "é",
            "😀",
            "\u202e",
            "\r\n",
            "../..",
        ]
    ),
    st.integers(min_value=65, max_value=5000).map(lambda n: "x" * n),
)
_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        ["2147483648", "9223372036854775808", "99999999999999999999", "-1", "0", "1e999", "NaN"]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
_dates = st.one_of(
    st.sampled_from(
        [
            "2024",
            "2024-02",
            "2024-02-30",
            "2024-13-45",
            "0000-01-01",
            "9999-12-31T23:59:59Z",
            "2024-01-01T25:61:61+99:99",
            "-2024",
            "99999",
        ]
    ),
    st.dates().map(str),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
)
_invalid_utf8 = st.binary(min_size=1, max_size=12).map(lambda b: b"\xff" + b)

# A path segment or value: text, or bytes that are not UTF-8 at all.
raw_values: st.SearchStrategy[bytes | str] = st.one_of(
    _hostile_text, _numbers, _dates, _invalid_utf8
)


@cache
def ids(known: tuple[str, ...]) -> st.SearchStrategy[bytes | str]:
    """A logical id: a known one, a fresh one, or anything a client could put in the URL."""
    return st.one_of(
        st.sampled_from(known) if known else st.nothing(),
        st.builds(fresh_id),
        st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True),
        st.integers(min_value=65, max_value=300).map(lambda n: "i" * n),
        raw_values,
    )


types = st.one_of(st.sampled_from(TYPES), st.sampled_from(["patient", "Foo", "Resource", "x"]))
versions = st.one_of(
    st.integers(min_value=-5, max_value=5).map(str),
    st.sampled_from(["2147483648", "18446744073709551616", "99999999999999999999", "1.0", "W/1"]),
    raw_values,
)


@cache
def operation_names() -> st.SearchStrategy[str]:
    """``$name`` of a registered operation, or of none."""
    names = sorted({op.name for op in all_operations()})
    return st.one_of(
        st.sampled_from(names), st.sampled_from(["x", "meta", "everything2", "$", "a" * 300])
    ).map(lambda n: f"${n}")


# -- query strings ------------------------------------------------------------------------------


@cache
def param_names(search_params: tuple[str, ...]) -> st.SearchStrategy[str]:
    """A parameter name: a real one (with a modifier or a chain), a result parameter, or junk."""
    base = st.sampled_from(search_params or COMMON_PARAMS)
    return st.one_of(
        base,
        st.sampled_from(RESULT_PARAMS),
        st.tuples(base, st.sampled_from(MODIFIERS)).map(lambda t: f"{t[0]}:{t[1]}"),
        st.tuples(base, st.sampled_from(TYPES), base).map(lambda t: f"{t[0]}:{t[1]}.{t[2]}"),
        st.tuples(base, base, base).map(lambda t: f"{t[0]}.{t[1]}.{t[2]}"),
        st.tuples(st.sampled_from(TYPES), base, base).map(lambda t: f"_has:{t[0]}:{t[1]}:{t[2]}"),
        _hostile_text,
    )


@cache
def param_values() -> st.SearchStrategy[bytes | str]:
    """A parameter value: prefixed numbers and dates, tokens, references, OR lists, junk."""
    token = st.tuples(_printable, _printable).map(lambda t: f"{t[0]}|{t[1]}")
    reference = st.tuples(st.sampled_from(TYPES), _printable).map(lambda t: f"{t[0]}/{t[1]}")
    prefixed = st.tuples(st.sampled_from(PREFIXES), st.one_of(_numbers, _dates)).map("".join)
    quantity = st.tuples(prefixed, _printable, _printable).map(lambda t: "|".join(t))
    result = st.sampled_from(
        [
            "Patient:general-practitioner",
            "*",
            "Task:focus:ServiceRequest",
            "-_lastUpdated",
            "name,-birthdate",
            "true",
            "count",
            "accurate",
            "data",
            "text",
            "id,meta",
        ]
    )
    single = st.one_of(token, reference, prefixed, quantity, result, raw_values)
    listed = st.lists(st.one_of(token, reference, prefixed, _printable), min_size=2, max_size=8)
    return st.one_of(single, listed.map(",".join))


@cache
def queries(search_params: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """An encoded query string: up to 8 parameters, some repeated (bounded: a repeat storm is
    the cost limits' test, not the fuzzer's)."""
    pair = st.tuples(param_names(search_params), param_values())

    @st.composite
    def build(draw: st.DrawFn) -> str:
        pairs = draw(st.lists(pair, max_size=8))
        if pairs and draw(st.booleans()):
            pairs += [pairs[0]] * draw(st.integers(min_value=1, max_value=6))
        return "&".join(f"{encode(k)}={encode(v)}" for k, v in pairs)

    return build()


# -- cursors ------------------------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)
json_values = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_printable, inner, max_size=4)
    ),
    max_leaves=12,
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@cache
def cursors() -> st.SearchStrategy[str]:
    """A ``_cursor`` value: the shape the server issues with hostile field values, or noise."""
    keys = st.one_of(
        st.lists(json_values, max_size=3),
        st.sampled_from([[None], [[1]], ["x"], [{"dt": "x"}], [{"dt": None}], [1, 2, 3, 4]]),
        json_values,
    )
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "k": keys,
            "p": json_values,
            "b": json_values,
            "m": json_values,
            "t": st.one_of(json_values, st.just("zz"), st.just(-1)),
        },
    )
    return st.one_of(
        shaped.map(lambda d: _b64(json.dumps(d).encode())),
        json_values.map(lambda v: _b64(json.dumps(v).encode())),
        st.binary(max_size=64).map(_b64),
        _hostile_text,
    )


# -- bodies -------------------------------------------------------------------------------------


def _dump(value: Any) -> bytes:
    """JSON as a careless client writes it (huge integers, NaN and all)."""
    return json.dumps(value).encode()


def nested(depth: int, kind: str) -> bytes:
    """A JSON document nested ``depth`` deep (in a resource's element, or bare arrays)."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"resourceType":"Patient","extension":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"


@cache
def resources(types_: st.SearchStrategy[str] = types) -> st.SearchStrategy[dict[str, Any]]:
    """Something shaped like a resource: a resourceType (right, wrong or absent), an id, junk."""
    return st.fixed_dictionaries(
        {"resourceType": st.one_of(types_, json_values)},
        optional={
            "id": st.one_of(st.builds(fresh_id), json_values),
            "meta": st.one_of(
                json_values, st.fixed_dictionaries({"versionId": json_values}, optional={})
            ),
            "name": json_values,
            "status": json_values,
            "subject": st.one_of(json_values, st.builds(lambda v: {"reference": v}, json_values)),
            "extension": json_values,
            "contained": st.lists(json_values, max_size=2),
            "text": json_values,
            "\x00": json_values,
        },
    )


@cache
def parameters() -> st.SearchStrategy[dict[str, Any]]:
    """A ``Parameters`` resource of the wrong shape (or, sometimes, a plausible one)."""
    value_key = st.sampled_from(
        [
            "valueString",
            "valueCode",
            "valueReference",
            "valueInteger",
            "valueBoolean",
            "valueDate",
            "valueQuantity",
            "valueMoney",
            "resource",
            "part",
            "valueX",
        ]
    )
    part = st.builds(
        lambda name, key, value: {"name": name, key: value},
        st.one_of(
            st.sampled_from(
                [
                    "reason",
                    "provider",
                    "report",
                    "answer",
                    "amount",
                    "operation",
                    "type",
                    "path",
                    "name",
                    "value",
                    "from",
                    "since",
                    "resource",
                    "mode",
                ]
            ),
            json_values,
        ),
        value_key,
        json_values,
    )
    shaped_list = st.lists(st.one_of(part, json_values), max_size=4)
    return st.fixed_dictionaries(
        {"resourceType": st.sampled_from(["Parameters", "Parameters", "Patient"])},
        optional={"parameter": st.one_of(shaped_list, json_values)},
    )


@cache
def fhirpath_patches() -> st.SearchStrategy[dict[str, Any]]:
    """A FHIRPath Patch ``Parameters`` whose operation parts have hostile names and values."""
    piece = st.builds(
        lambda name, value: {"name": name, "valueString": value} if name != "part" else value,
        st.one_of(
            st.sampled_from(["type", "path", "name", "value", "index", "source", "destination"]),
            json_values,
        ),
        json_values,
    )
    op = st.builds(
        lambda parts, kind: {
            "name": "operation",
            "part": [{"name": "type", "valueCode": kind}, *parts],
        },
        st.lists(piece, max_size=4),
        st.sampled_from(["add", "insert", "delete", "replace", "move", "x"]),
    )
    return st.builds(
        lambda ops: {"resourceType": "Parameters", "parameter": ops}, st.lists(op, max_size=3)
    )


@cache
def json_patches() -> st.SearchStrategy[Any]:
    """A JSON Patch document (RFC 6902), mostly malformed."""
    op = st.fixed_dictionaries(
        {"op": st.one_of(st.sampled_from(["add", "remove", "replace", "move", "copy", "test"]))},
        optional={
            "path": st.one_of(st.sampled_from(["/id", "/meta", "/name/0", "/", "", "/-"]), _text),
            "from": _text,
            "value": json_values,
        },
    )
    return st.one_of(st.lists(op, max_size=4), json_values)


@cache
def bundles(known: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    """A transaction or batch Bundle with hostile entries (deletes only by fresh ids)."""
    safe_url = st.one_of(
        st.tuples(st.sampled_from(TYPES), ids(known)).map(lambda t: f"{t[0]}/{_text_of(t[1])}"),
        st.sampled_from(TYPES),
        st.builds(lambda t, q: f"{t}?{q}&_id={fresh_id()}", st.sampled_from(TYPES), queries()),
        _text,
    )
    request = st.one_of(
        st.fixed_dictionaries(
            {"method": st.sampled_from(["GET", "POST", "PUT", "PATCH", "HEAD", "x"])},
            optional={"url": safe_url, "ifMatch": _text, "ifNoneExist": _text},
        ),
        st.builds(
            lambda t: {"method": "DELETE", "url": f"{t}/{fresh_id()}"}, st.sampled_from(TYPES)
        ),
        json_values,
    )
    entry = st.fixed_dictionaries(
        {},
        optional={
            "fullUrl": st.one_of(st.builds(lambda: f"urn:uuid:{uuid.uuid4()}"), _text),
            "resource": st.one_of(resources(), json_values),
            "request": request,
        },
    )
    return st.fixed_dictionaries(
        {
            "resourceType": st.sampled_from(["Bundle", "Bundle", "Patient"]),
            "type": st.one_of(st.sampled_from(["transaction", "batch", "collection"]), json_values),
        },
        optional={"entry": st.one_of(st.lists(entry, max_size=4), json_values)},
    )


def _text_of(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


@cache
def bodies(known: tuple[str, ...] = ()) -> st.SearchStrategy[bytes]:
    """A request body: malformed JSON, wrong shapes, deep nesting, huge numbers, NULs, bad
    UTF-8 — and well-formed resources, Parameters, patches and Bundles with hostile values."""
    return st.one_of(
        st.sampled_from(
            [
                b"",
                b" ",
                b"{",
                b"null",
                b"[]",
                b"{}",
                b'"Patient"',
                b"\x00",
                b'{"resourceType":"Patient"',
                b'{"resourceType":"Patient","resourceType":"Task"}',
                b'{"resourceType":"Patient","birthDate":1e99999}',
                b'{"resourceType":"Patient","multipleBirthInteger":' + b"9" * 400 + b"}",
                b'{"resourceType":"Patient","name":[{"family":"\xff\xfe"}]}',
                b'{"resourceType":"Patient","name":[{"family":"a\\u0000b"}]}',
                b'{"resourceType":"Patient","name":[{"family":"\\ud800"}]}',
                b"\xef\xbb\xbf{}",
                b'{"resourceType":"Patient","active":NaN}',
            ]
        ),
        st.tuples(
            st.integers(min_value=50, max_value=3000), st.sampled_from(["array", "object"])
        ).map(lambda t: nested(*t)),
        json_values.map(_dump),
        resources().map(_dump),
        parameters().map(_dump),
        fhirpath_patches().map(_dump),
        json_patches().map(_dump),
        bundles(known).map(_dump),
        st.binary(max_size=200),
    )


# -- headers ------------------------------------------------------------------------------------

_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)
CONTENT_TYPES = (
    "application/fhir+json",
    "application/fhir+json; charset=utf-8",
    "application/json",
    "application/json-patch+json",
    "application/x-www-form-urlencoded",
    "application/fhir+xml",
    "text/plain",
    "application/pdf",
    "multipart/form-data; boundary=x",
    "",
    ";;;",
)


@cache
def header_sets() -> st.SearchStrategy[dict[str, str]]:
    """Some of the headers the server reads, with valid and hostile values."""
    etag = st.one_of(
        st.sampled_from(['W/"1"', '"1"', "W/1", 'W/"99999999999999999999"', 'W/"-1"', "*", ""]),
        _header_text,
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "If-Match": etag,
            "If-None-Match": etag,
            "If-None-Exist": st.one_of(
                st.builds(lambda q: f"{q}&_id={fresh_id()}", queries()), _header_text
            ),
            "If-Modified-Since": st.one_of(_dates, _header_text),
            "Prefer": st.one_of(
                st.sampled_from(
                    [
                        "return=minimal",
                        "return=representation",
                        "return=OperationOutcome",
                        "handling=strict",
                        "handling=lenient",
                        "respond-async",
                        "return=minimal, handling=lenient",
                        "return",
                        "=",
                    ]
                ),
                _header_text,
            ),
            "Content-Type": st.one_of(st.sampled_from(CONTENT_TYPES), _header_text),
            "Accept": st.one_of(
                st.sampled_from(
                    ["application/fhir+json", "application/fhir+xml", "*/*", "text/html", ""]
                ),
                _header_text,
            ),
            "X-Forwarded-For": st.one_of(
                st.sampled_from(["10.0.0.1", "10.0.0.1, 10.0.0.2", "::1", "unknown", ""]),
                st.integers(min_value=65, max_value=2000).map(lambda n: "1" * n),
                _header_text,
            ),
            "X-Security-Context": _header_text,
        },
    )


# -- whole requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """What exists in the fuzzed world: ids to aim at and each type's search parameter names."""

    ids: tuple[str, ...]
    task: str
    search_params: tuple[tuple[str, tuple[str, ...]], ...]

    def params_of(self, resource_type: str) -> tuple[str, ...]:
        """The search parameter names of ``resource_type`` (none for an unknown type)."""
        return dict(self.search_params).get(resource_type, ())


def route_label(route: Route) -> str:
    """``GET {type}/{id}`` — a route's test id."""
    return f"{route.method} /{'/'.join(route.pattern)}"


def _segment(draw: st.DrawFn, placeholder: str, known: Known, resource_type: str) -> bytes | str:
    if placeholder == "{type}" or placeholder == "{ctype}":
        return resource_type if placeholder == "{type}" else draw(types)
    if placeholder == "{id}":
        return draw(ids(known.ids))
    if placeholder == "{vid}":
        return draw(versions)
    if placeholder == "{op}":
        return draw(operation_names())
    return placeholder


@cache
def route_requests(route: Route, known: Known) -> st.SearchStrategy[FuzzRequest]:
    """Requests for one route: its placeholders filled with known and hostile values, a
    hostile query, headers, body (for POST, PUT, PATCH) and credential."""

    @st.composite
    def build(draw: st.DrawFn) -> FuzzRequest:
        resource_type = draw(types)
        segments = [encode(_segment(draw, p, known, resource_type)) for p in route.pattern]
        query = draw(queries(known.params_of(resource_type)))
        if route.conditional:
            query = "&".join(q for q in (query, f"_id={fresh_id()}") if q)
        body = draw(bodies(known.ids)) if route.method in BODY_METHODS else None
        return FuzzRequest(
            method=route.method,
            path="/".join(segments),
            query=query,
            headers=draw(header_sets()),
            body=body,
            auth=draw(st.sampled_from(AUTH_KINDS)),
        )

    return build()


def operation_targets() -> list[tuple[str, str]]:
    """(label, path template) for every registered operation at every level and type it
    accepts; ``{id}`` in a template is the target instance, filled in at run time."""
    out: list[tuple[str, str]] = []
    for op in all_operations():
        allowed = sorted(op.resource_types) if op.resource_types is not None else ["Patient"]
        for level in sorted(op.levels):
            if level == "system":
                out.append((f"system ${op.name}", f"${op.name}"))
                continue
            for rtype in allowed:
                path = f"{rtype}/${op.name}" if level == "type" else f"{rtype}/{{id}}/${op.name}"
                out.append((f"{level} {rtype} ${op.name}", path))
    return out
