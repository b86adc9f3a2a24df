"""Invoice/[id]/$record-payment: an administrator records that an MSO invoice was paid.

An MSO operation (issue 5, step 10; DESIGN.md, invoice): the body is a Parameters resource
(http://hl7.org/fhir/R4/parameters.html) with

* ``amount`` — ``valueMoney`` (or ``valueDecimal`` in the invoice currency), required, equal to
  the invoice's ``totalGross``;
* ``date`` — ``valueDate`` (or ``valueDateTime``) the payment was received, default today (UTC);
* ``reference`` — ``valueString`` (or ``valueIdentifier.value``): the payer's payment
  reference, kept as the PaymentNotice's logical ``payment`` reference.

Only administrators (and backend system clients without an organization) may call it
(``MSO-BILL-403`` otherwise). The answer is a Parameters with the created ``paymentNotice``
and the now ``balanced`` ``invoice``. The work is done by
:meth:`fhir_server.workflow.billing.Billing.record_payment`.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from fhir_server.auth.policy import require_platform
from fhir_server.codes import OPERATION_RECORD_PAYMENT
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_write
from fhir_server.interactions.operations import Operation, register
from fhir_server.workflow.billing import Billing


def _bad(message: str, code: str = "MSO-BILL-010") -> FhirError:
    return FhirError(400, "invalid", message, code=code)


def _parameters(req: FhirRequest) -> dict[str, dict[str, Any]]:
    body = req.body
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise _bad("$record-payment needs a Parameters body")
    return {
        p["name"]: p
        for p in body.get("parameter") or ()
        if isinstance(p, dict) and isinstance(p.get("name"), str)
    }


def _amount(param: dict[str, Any] | None) -> tuple[Decimal, str | None]:
    if param is None:
        raise _bad("The 'amount' parameter is required", "MSO-BILL-011")
    if "valueMoney" in param:
        value, currency = param["valueMoney"].get("value"), param["valueMoney"].get("currency")
    else:
        value, currency = param.get("valueDecimal"), None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("'amount' must be a valueMoney or valueDecimal", "MSO-BILL-011")
    try:
        return Decimal(str(value)), currency
    except InvalidOperation:
        raise _bad("'amount' is not a number", "MSO-BILL-011") from None


def _date(param: dict[str, Any] | None) -> str | None:
    if param is None:
        return None
    value = param.get("valueDate") or param.get("valueDateTime")
    if not isinstance(value, str) or len(value) < 10:
        raise _bad("'date' must be a valueDate", "MSO-BILL-012")
    return value[:10]


def _reference(param: dict[str, Any] | None) -> str | None:
    if param is None:
        return None
    value = param.get("valueString") or (param.get("valueIdentifier") or {}).get("value")
    if not isinstance(value, str) or not value.strip():
        raise _bad("'reference' must be a non-empty valueString", "MSO-BILL-013")
    return value.strip()


def _billing(ctx: InteractionContext) -> Billing:
    billing = ctx.services.billing
    if billing is None:
        raise FhirError(501, "not-supported", "Billing is not enabled", code="MSO-OP-501")
    return billing


def _check_role(caller: Any) -> None:
    require_platform(caller, "record invoice payments", "MSO-BILL-403")


def _record_payment(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    _check_role(ctx.caller)
    params = _parameters(req)
    amount, currency = _amount(params.get("amount"))
    paid_on = _date(params.get("date"))
    reference = _reference(params.get("reference"))
    billing = _billing(ctx)
    notice, invoice = run_write(
        ctx,
        lambda tx: billing.record_payment(
            tx,
            req.resource_id or "",
            amount=amount,
            currency=currency,
            paid_on=paid_on,
            reference=reference,
            actor=ctx.caller,
        ),
    )
    return FhirResponse(
        resource={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "paymentNotice", "resource": notice.resource},
                {"name": "invoice", "resource": invoice.resource},
            ],
        }
    )


register(
    Operation(
        name="record-payment",
        levels=frozenset({"instance"}),
        handler=_record_payment,
        definition=OPERATION_RECORD_PAYMENT,
        resource_types=frozenset({"Invoice"}),
        idempotent=False,
        documentation="Admin: record the payment of an invoice (PaymentNotice; Invoice balanced)",
    )
)
