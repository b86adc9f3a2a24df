"""The MSO case operations on the case Task (DESIGN.md, Case statuses).

``POST [base]/Task/[id]/$assign | $accept | $reject | $start | $return | $complete | $cancel``
move the case (Parameters in, the updated Task out); ``GET [base]/Task/[id]/$suggest-providers``
ranks providers for it (admins); ``POST [base]/Task/[issue id]/$answer`` is the requester's
answer to a case issue (the one a ``$return`` opened), after which the provider ``$start`` s
again. Operation semantics: http://hl7.org/fhir/R4/operations.html. The rules are in
:mod:`fhir_server.workflow.status`, the work in :mod:`fhir_server.workflow.service`; these
handlers only read Parameters and shape the reply.

Parameters: ``provider`` (valueReference to a PractitionerRole) for ``$assign``; ``reason``
(valueString, or valueCodeableConcept with text) for ``$reject`` and ``$return``; ``report``
(valueReference to the DiagnosticReport, optional) for ``$complete``; ``answer`` (valueString)
for ``$answer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fhir_server.auth.policy import require_platform
from fhir_server.auth.scopes import Permission
from fhir_server.codes import CANONICAL_BASE
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_read, run_write, write_response
from fhir_server.interactions.operations import Operation, register
from fhir_server.workflow.service import Workflow
from fhir_server.workflow.status import Action, Move, ref_id

DEFINITION_BASE = f"{CANONICAL_BASE}/OperationDefinition"


def _workflow(ctx: InteractionContext) -> Workflow:
    workflow = ctx.services.workflow
    if workflow is None:
        raise FhirError(501, "not-supported", "The case workflow is not enabled", code="MSO-OP-501")
    return workflow


def _parameters(req: FhirRequest) -> dict[str, Any]:
    """Parameter name -> its value element (first occurrence); query parameters too."""
    out: dict[str, Any] = {name: value for name, value in req.params}
    body = req.body
    if body is None:
        return out
    if body.get("resourceType") != "Parameters":
        raise FhirError(
            400, "invalid", "The operation takes a Parameters resource", code="MSO-OP-003"
        )
    for parameter in body.get("parameter") or ():
        name = (parameter or {}).get("name")
        if not name or name in out:
            continue
        for key, value in parameter.items():
            if key.startswith("value"):
                out[name] = value
    return out


def _text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("text") or next(
            (c.get("display") or c.get("code") for c in value.get("coding") or () if c), None
        )
    return str(value) if value is not None else None


def _reference_id(value: Any, rtype: str) -> str | None:
    if isinstance(value, dict):
        return ref_id(value, rtype)
    if isinstance(value, str):
        return ref_id(value, rtype) or (value if "/" not in value else None)
    return None


def _move(req: FhirRequest) -> Move:
    params = _parameters(req)
    return Move(
        reason=_text(params.get("reason")),
        provider=_reference_id(params.get("provider"), "PractitionerRole"),
        report=_reference_id(params.get("report"), "DiagnosticReport"),
    )


def _require_update(ctx: InteractionContext) -> None:
    policy = ctx.repo.policy
    if policy is not None:
        policy.require(ctx.caller, "Task", Permission.UPDATE)


def _transition(action: Action) -> Callable[[InteractionContext, FhirRequest], FhirResponse]:
    def handler(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
        workflow = _workflow(ctx)
        move = _move(req)
        _require_update(ctx)
        task_id = req.resource_id or ""
        stored = run_write(
            ctx, lambda tx: workflow.transition(tx, task_id, action, move, caller=ctx.caller)
        )
        return write_response(ctx, req, stored, status=200, message=f"${action.value} done")

    handler.__doc__ = f"POST [base]/Task/[id]/${action.value}"
    return handler


def _answer(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST [base]/Task/[issue id]/$answer."""
    workflow = _workflow(ctx)
    answer = _text(_parameters(req).get("answer")) or ""
    _require_update(ctx)
    issue_id = req.resource_id or ""
    stored = run_write(ctx, lambda tx: workflow.answer(tx, issue_id, answer, caller=ctx.caller))
    return write_response(ctx, req, stored, status=200, message="Issue answered")


def _suggest(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/Task/[id]/$suggest-providers (administrators)."""
    from fhir_server.codes import CaseStatus
    from fhir_server.workflow import providers
    from fhir_server.workflow.cases import case_task_state, current

    require_platform(ctx.caller, "rank providers", "MSO-CASE-403")
    task_id = req.resource_id or ""

    def work(tx: Any) -> dict[str, Any]:
        tx.read("Task", task_id)
        _, case = case_task_state(tx, task_id)
        request = current(tx, "ServiceRequest", case.case_id)
        exclude = {case.owner} if case.owner and case.status is CaseStatus.REJECTED else set()
        ranked = providers.rank(tx, request.resource if request else {}, exclude=exclude)
        return providers.as_parameters(ranked)

    return FhirResponse(resource=run_read(ctx, work))


for _action in Action:
    register(
        Operation(
            name=_action.value,
            levels=frozenset({"instance"}),
            handler=_transition(_action),
            definition=f"{DEFINITION_BASE}/case-{_action.value}",
            resource_types=frozenset({"Task"}),
            idempotent=False,
            documentation=f"Case workflow: ${_action.value} on the case Task",
        )
    )
register(
    Operation(
        name="answer",
        levels=frozenset({"instance"}),
        handler=_answer,
        definition=f"{DEFINITION_BASE}/case-issue-answer",
        resource_types=frozenset({"Task"}),
        idempotent=False,
        documentation="The requester answers a case issue (a returned case's question)",
    )
)
register(
    Operation(
        name="suggest-providers",
        levels=frozenset({"instance"}),
        handler=_suggest,
        definition=f"{DEFINITION_BASE}/case-suggest-providers",
        resource_types=frozenset({"Task"}),
        idempotent=True,
        documentation="Providers for the case ranked by specialty, availability and workload",
    )
)
