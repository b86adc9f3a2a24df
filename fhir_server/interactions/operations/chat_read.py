"""``POST [base]/Communication/$mark-read`` and ``GET [base]/Communication/$unread``: what each
user has read of the case chats (http://hl7.org/fhir/R4/operations.html; the MSO chat rules'
unread counter).

``$mark-read`` takes a Parameters body with ``case`` (``valueReference`` to the case
ServiceRequest, required) and at most one of ``until`` (``valueInstant``: every message sent
then or before is read) and ``message`` (``valueReference`` to a chat message of the case: it
and every earlier one are read); with neither, the whole case is read. It answers a Parameters
with the ``case`` and the ``count`` of its messages still unread. A read position only moves
forward.

``$unread`` (no parameters) answers a Parameters with ``total`` (``valueInteger``) and one
``case`` per case with unread messages (parts ``case`` ``valueReference`` and ``count``
``valueInteger``), in case id order: the chat messages the caller may see and did not send.

Both are for the parties of a case's chat (its requester side and its assigned provider);
administrators have no chat, so their ``$unread`` is always 0 and their ``$mark-read`` a 403.
The work is :mod:`fhir_server.messaging.read_state`. Errors: a malformed Parameters body 400
``MSO-CHAT-400``; a case the caller does not see 404 ``MSO-CHAT-404``; not a party 403
``MSO-CHAT-403``; not a case, or a message of another case 422 ``MSO-CHAT-422``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_server.auth.scopes import Permission
from fhir_server.codes import CANONICAL_BASE
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_read, run_write
from fhir_server.interactions.operations import Operation, register
from fhir_server.messaging import read_state
from fhir_server.storage.records import ID_PATTERN

OPERATION_MARK_READ = f"{CANONICAL_BASE}/OperationDefinition/Communication-mark-read"
OPERATION_UNREAD = f"{CANONICAL_BASE}/OperationDefinition/Communication-unread"
_INSTANT = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.ASCII
)
_NAMES = frozenset({"case", "until", "message"})


@dataclass(frozen=True, slots=True)
class _MarkRead:
    case_id: str
    until: datetime | None = None
    message_id: str | None = None


def _bad(message: str, expression: str | None = None) -> FhirError:
    return FhirError(
        400,
        "invalid",
        message,
        code="MSO-CHAT-400",
        expression=[expression] if expression else None,
    )


def _arguments(req: FhirRequest) -> _MarkRead:
    """The inputs of ``$mark-read`` (400 for anything but the documented ones, once each)."""
    body = req.body
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise _bad("$mark-read needs a Parameters body")
    given: dict[str, dict[str, Any]] = {}
    for parameter in body.get("parameter") or ():
        name = parameter["name"]  # the shape was checked for every operation
        if name not in _NAMES:
            raise _bad(f"$mark-read has no parameter '{name}'", "Parameters.parameter.name")
        if name in given:
            raise _bad(f"'{name}' is given more than once", name)
        given[name] = parameter
    if "case" not in given:
        raise _bad("'case' (a valueReference to the case ServiceRequest) is required", "case")
    if "until" in given and "message" in given:
        raise _bad("Give 'until' or 'message', not both", "until")
    return _MarkRead(
        case_id=_reference(given["case"], "ServiceRequest"),
        until=_instant(given["until"]) if "until" in given else None,
        message_id=_reference(given["message"], "Communication") if "message" in given else None,
    )


def _reference(parameter: dict[str, Any], res_type: str) -> str:
    """The id in a ``valueReference`` to ``res_type/id``."""
    name = parameter["name"]
    reference = (parameter.get("valueReference") or {}).get("reference")
    prefix = f"{res_type}/"
    if not isinstance(reference, str) or not reference.startswith(prefix):
        raise _bad(f"'{name}' must be a valueReference to a {res_type}", name)
    res_id = reference[len(prefix) :]
    if not ID_PATTERN.match(res_id):
        raise _bad(f"'{name}' must be a valueReference to a {res_type}", name)
    return res_id


def _instant(parameter: dict[str, Any]) -> datetime:
    value = parameter.get("valueInstant")
    if not isinstance(value, str) or not _INSTANT.fullmatch(value):
        raise _bad("'until' must be a valueInstant", "until")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _bad("'until' must be a valueInstant", "until") from None


def _require(ctx: InteractionContext, permission: Permission) -> None:
    policy = ctx.repo.policy
    if policy is not None:
        policy.require(ctx.caller, "Communication", permission)


def _case(case_id: str) -> dict[str, Any]:
    return {"name": "case", "valueReference": {"reference": f"ServiceRequest/{case_id}"}}


def _mark_read(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST [base]/Communication/$mark-read"""
    _require(ctx, Permission.READ)
    args = _arguments(req)
    left = run_write(
        ctx,
        lambda tx: read_state.mark_read(
            tx, ctx.caller, args.case_id, until=args.until, message_id=args.message_id
        ),
    )
    return FhirResponse(
        resource={
            "resourceType": "Parameters",
            "parameter": [_case(args.case_id), {"name": "count", "valueInteger": left}],
        }
    )


def _unread(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/Communication/$unread"""
    _require(ctx, Permission.SEARCH)
    found = run_read(ctx, lambda tx: read_state.unread(tx, ctx.caller))
    parameters: list[dict[str, Any]] = [
        {"name": "total", "valueInteger": sum(u.count for u in found)}
    ]
    parameters.extend(
        {"name": "case", "part": [_case(u.case_id), {"name": "count", "valueInteger": u.count}]}
        for u in found
    )
    return FhirResponse(resource={"resourceType": "Parameters", "parameter": parameters})


register(
    Operation(
        name="mark-read",
        levels=frozenset({"type"}),
        handler=_mark_read,
        definition=OPERATION_MARK_READ,
        resource_types=frozenset({"Communication"}),
        idempotent=False,
        documentation="Case chat: mark a case's messages read (all, up to an instant, or up "
        "to a message) for the calling user",
    )
)
register(
    Operation(
        name="unread",
        levels=frozenset({"type"}),
        handler=_unread,
        definition=OPERATION_UNREAD,
        resource_types=frozenset({"Communication"}),
        idempotent=True,
        documentation="Case chat: the calling user's unread messages, in total and per case",
    )
)
