"""Billing: a ChargeItem and an Invoice when a case is Done; payments recorded by an admin.

DESIGN.md (FHIR model, invoice) and issue 5 step 10, on R4 financial resources:
ChargeItemDefinition (http://hl7.org/fhir/R4/chargeitemdefinition.html), ChargeItem
(http://hl7.org/fhir/R4/chargeitem.html), Invoice (http://hl7.org/fhir/R4/invoice.html) and
PaymentNotice (http://hl7.org/fhir/R4/paymentnotice.html).

**Prices.** The ChargeItemDefinitions in ``profiles/charge-item-definitions/`` (stored at
start-up by :mod:`fhir_server.conformance`, so admins can read and change them over FHIR) list
the specialties they price as ``useContext`` entries (code ``focus``, value a specialty coding)
and one ``propertyGroup`` per priority, whose ``applicability`` is a FHIRPath condition on the
case ServiceRequest (``text/fhirpath``). The case's specialty is its ``ServiceRequest.code``
(MSO specialty system), else the provider's ``PractitionerRole.specialty``; a specialty no
definition lists is priced by :data:`~fhir_server.codes.CHARGE_DEFINITION_DEFAULT`.
Every applicable group contributes its price components: ``base``, ``surcharge`` and ``tax``
add, ``discount`` and ``deduction`` subtract, ``informational`` is ignored; a component with a
``factor`` and no ``amount`` is that factor of the base. Amounts carry no currency (or the
configured one): they are in ``Settings.currency`` (``MSO_CURRENCY``, default EUR).

**On Done** (:class:`~fhir_server.workflow.events.CaseEventKind` ``DONE``), in the transaction
that completes the case: a ChargeItem (status billable; subject the patient; performer the
provider's PractitionerRole; service the recommendation DiagnosticReport the event names as its
``subject``; ``priceOverride`` the computed price, ``overrideReason`` naming the definition and
priority; ``definitionCanonical`` the definition's ``url|version``) and an Invoice (status
issued; recipient the requester's Organization, or the Patient for a self-request; one line
item referencing the ChargeItem; ``totalNet`` = ``totalGross``), then ``INVOICE_ISSUED``. A
case with an Invoice that is not cancelled or entered-in-error is not billed again.

**The case reference.** R4 ChargeItem, Invoice and PaymentNotice have no element that may
reference a ServiceRequest (``ChargeItem.context`` is Encounter/EpisodeOfCare only), so each
carries the extension :data:`~fhir_server.codes.EXT_CASE_REFERENCE` with
``valueReference`` = ``ServiceRequest/<case id>``, indexed by the MSO search parameter
``case`` (``Invoice?case=ServiceRequest/<id>``). That indexed reference is what puts them in the
case for the access policy.

**Payment.** :meth:`Billing.record_payment` (operation ``Invoice/[id]/$record-payment``, see
:mod:`fhir_server.interactions.operations.record_payment`): an admin states the amount (it must
equal ``totalGross``), the date and the payer's reference; a PaymentNotice (status active,
paymentStatus paid, request the Invoice, payment a logical reference carrying the payer's
reference) is created and the Invoice becomes ``balanced``, then ``INVOICE_PAID``.

Errors: ``MSO-BILL-001`` no ChargeItemDefinition prices the case, ``MSO-BILL-002`` no price
component applies, ``MSO-BILL-003`` the case is unknown, ``MSO-BILL-004`` the Invoice is not
open for payment (409), ``MSO-BILL-005`` the amount is not the invoice total (422),
``MSO-BILL-006`` an Invoice without case reference or total.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fhirpathpy import compile as fp_compile
from fhirpathpy.models import models as fp_models

from fhir_server import codes
from fhir_server.fhir.outcome import FhirError
from fhir_server.workflow.events import CaseEvent, CaseEventKind, CaseEvents

if TYPE_CHECKING:
    from fhir_server.storage.repository import StoredResource, Tx

log = logging.getLogger(__name__)

PAYMENT_STATUS_SYSTEM = "http://terminology.hl7.org/CodeSystem/paymentstatus"
PLATFORM_DISPLAY = "MSO platform"
"""Who receives payments (``PaymentNotice.recipient`` is a display-only Reference)."""
_VOID_STATUSES = frozenset({"cancelled", "entered-in-error"})
_ADDING = frozenset({"base", "surcharge", "tax"})
_SUBTRACTING = frozenset({"discount", "deduction"})


# -- prices ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Price:
    """What a case costs, and from which definition."""

    total: Decimal
    currency: str
    definition: str
    """``url|version`` of the ChargeItemDefinition."""
    components: list[dict[str, Any]] = field(default_factory=list)
    """The applied price components, as Invoice ``lineItem.priceComponent`` JSON."""
    priority: str = "routine"


def money(value: Decimal, currency: str) -> dict[str, Any]:
    """A FHIR Money: integral amounts as integers, others with two decimals."""
    number: int | float = int(value) if value == value.to_integral_value() else float(value)
    return {"value": number, "currency": currency}


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return None


@lru_cache(maxsize=256)
def _condition(expression: str) -> Any:
    return fp_compile(expression, fp_models["r4"])


def applies(group: dict[str, Any], service_request: dict[str, Any]) -> bool:
    """True when every ``applicability`` condition of a property group holds for the case.

    Conditions are FHIRPath (``text/fhirpath``) evaluated on the case ServiceRequest; a
    condition in any other language, or one that fails to evaluate, does not hold.
    """
    for condition in group.get("applicability") or ():
        expression = (condition or {}).get("expression")
        if (condition or {}).get("language", "text/fhirpath") != "text/fhirpath" or not expression:
            return False
        try:
            if _condition(expression)(service_request, {}) != [True]:
                return False
        except Exception:  # a definition with a broken expression prices nothing
            log.warning("cannot evaluate ChargeItemDefinition applicability %r", expression)
            return False
    return True


def price_from_definition(
    definition: dict[str, Any], service_request: dict[str, Any], currency: str
) -> Price:
    """The price ``definition`` gives the case ``service_request`` (see the module docs)."""
    canonical = f"{definition.get('url')}|{definition.get('version')}"
    base = Decimal(0)
    plus_minus: list[tuple[str, Decimal, dict[str, Any]]] = []
    factors: list[tuple[str, Decimal, dict[str, Any]]] = []
    for group in definition.get("propertyGroup") or ():
        if not applies(group, service_request):
            continue
        for component in group.get("priceComponent") or ():
            kind = component.get("type")
            if kind not in _ADDING | _SUBTRACTING:
                continue
            amount = component.get("amount") or {}
            if amount.get("currency") not in (None, currency):
                continue
            value = _decimal(amount.get("value"))
            factor = _decimal(component.get("factor"))
            if value is None and factor is None:
                continue
            if value is not None and kind == "base":
                base += value
            if value is not None:
                plus_minus.append((kind, value, component))
            else:
                factors.append((kind, factor or Decimal(0), component))
    if not any(kind == "base" for kind, _, _ in plus_minus):
        raise FhirError(
            500,
            "exception",
            f"ChargeItemDefinition {canonical} has no base price for this case "
            f"(priority {service_request.get('priority') or 'routine'}, currency {currency})",
            code="MSO-BILL-002",
        )
    total = Decimal(0)
    applied: list[dict[str, Any]] = []
    for kind, value, component in [*plus_minus, *((k, f * base, c) for k, f, c in factors)]:
        total += value if kind in _ADDING else -value
        out = {"type": kind, "amount": money(value, currency)}
        for key in ("code", "factor"):
            if key in component:
                out[key] = component[key]
        applied.append(out)
    return Price(
        total=max(total, Decimal(0)),
        currency=currency,
        definition=canonical,
        components=applied,
        priority=str(service_request.get("priority") or "routine"),
    )


def specialties_of(service_request: dict[str, Any], provider: dict[str, Any] | None) -> list[str]:
    """The MSO specialty codes of the case (``ServiceRequest.code``), then the provider's."""
    concepts = [service_request.get("code"), *((provider or {}).get("specialty") or ())]
    out: list[str] = []
    for concept in concepts:
        for coding in (concept or {}).get("coding") or ():
            code = (coding or {}).get("code")
            if (coding or {}).get("system") == codes.SPECIALTY_SYSTEM and code and code not in out:
                out.append(code)
    return out


def _lists_specialty(definition: dict[str, Any], specialty: str) -> bool:
    for context in definition.get("useContext") or ():
        if ((context or {}).get("code") or {}).get("code") != codes.USAGE_CONTEXT_FOCUS:
            continue
        for coding in ((context or {}).get("valueCodeableConcept") or {}).get("coding") or ():
            if coding.get("system") == codes.SPECIALTY_SYSTEM and coding.get("code") == specialty:
                return True
    return False


def find_definition(tx: Tx, specialties: list[str]) -> dict[str, Any]:
    """The active ChargeItemDefinition pricing the first of ``specialties`` that has one, else
    the default definition; ``MSO-BILL-001`` when there is none."""
    for specialty in specialties:
        found = tx.find(
            "ChargeItemDefinition",
            [("context", f"{codes.SPECIALTY_SYSTEM}|{specialty}"), ("status", "active")],
        )
        matching = sorted(
            (s.resource for s in found if _lists_specialty(s.resource, specialty)),
            key=lambda r: (str(r.get("url")), str(r.get("version"))),
        )
        if matching:
            return matching[0]
    found = tx.find(
        "ChargeItemDefinition", [("url", codes.CHARGE_DEFINITION_DEFAULT), ("status", "active")]
    )
    if found:
        return found[0].resource
    raise FhirError(
        500,
        "exception",
        "No active ChargeItemDefinition prices this case (specialties "
        f"{', '.join(specialties) or 'none'}) and the default {codes.CHARGE_DEFINITION_DEFAULT} "
        "is missing",
        code="MSO-BILL-001",
    )


# -- helpers -----------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def case_extension(case_id: str) -> dict[str, Any]:
    """The :data:`~fhir_server.codes.EXT_CASE_REFERENCE` extension for a case."""
    return {
        "url": codes.EXT_CASE_REFERENCE,
        "valueReference": {"reference": f"ServiceRequest/{case_id}"},
    }


def case_of(resource: dict[str, Any]) -> str | None:
    """The case ServiceRequest id a billing resource carries in its extension."""
    for ext in resource.get("extension") or ():
        if (ext or {}).get("url") == codes.EXT_CASE_REFERENCE:
            ref = ((ext or {}).get("valueReference") or {}).get("reference") or ""
            if ref.startswith("ServiceRequest/"):
                return ref.split("/", 1)[1]
    return None


def _ref_parts(reference: str | None) -> tuple[str, str] | None:
    if not reference or reference.count("/") != 1:
        return None
    rtype, rid = reference.split("/")
    return rtype, rid


def _live(tx: Tx, reference: str | None) -> dict[str, Any] | None:
    parts = _ref_parts(reference)
    if parts is None:
        return None
    found = tx.current(*parts)
    return None if found is None or found.deleted else found.resource


def case_number_of(service_request: dict[str, Any]) -> str:
    """The ``CASE-XXXXXX`` identifier of a case ('' when it has none yet)."""
    for identifier in service_request.get("identifier") or ():
        if (identifier or {}).get("system") == codes.CASE_NUMBER_SYSTEM:
            return str(identifier.get("value") or "")
    return ""


# -- the service -------------------------------------------------------------------------------


class Billing:
    """Bills Done cases and records payments; subscribed to a :class:`CaseEvents` bus."""

    def __init__(self, events: CaseEvents, *, currency: str = "EUR") -> None:
        self.events = events
        self.currency = currency

    def subscribe(self) -> None:
        """Bill every case the bus announces as Done."""
        self.events.subscribe(self.on_done, CaseEventKind.DONE)

    def on_done(self, tx: Tx, event: CaseEvent) -> None:
        """Subscriber: :meth:`bill_case` for a ``DONE`` event."""
        self.bill_case(tx, event)

    # -- issuing ---------------------------------------------------------------------------

    def bill_case(self, tx: Tx, event: CaseEvent) -> StoredResource | None:
        """Create the ChargeItem and Invoice of a Done case (``None`` when already billed)."""
        case_ref = f"ServiceRequest/{event.case_id}"
        with tx.internal():
            found = tx.current("ServiceRequest", event.case_id)
            if found is None or found.deleted:
                raise FhirError(409, "not-found", f"{case_ref} is not a case", code="MSO-BILL-003")
            case = found.resource
            tx.lock_criteria("Invoice", [(codes.BILLING_CASE_PARAM, case_ref)])
            invoices = tx.find("Invoice", [(codes.BILLING_CASE_PARAM, case_ref)])
            if any(s.resource.get("status") not in _VOID_STATUSES for s in invoices):
                log.info("%s is already invoiced; not billed again", case_ref)
                return None
            provider_ref = event.provider or _performer(case)
            provider = _live(tx, provider_ref)
            price = price_from_definition(
                find_definition(tx, specialties_of(case, provider)), case, self.currency
            )
            recipient = self._recipient(tx, case, event)
            charge = tx.create(
                self._charge_item(event, case, provider_ref, provider, recipient, price)
            )
            case_number = event.case_number or case_number_of(case)
            number = _invoice_number(case_number or event.case_id, len(invoices))
            invoice = tx.create(
                self._invoice(event.case_id, case, recipient, charge.res_id, price, number)
            )
        self.events.emit(
            tx,
            CaseEvent(
                kind=CaseEventKind.INVOICE_ISSUED,
                case_id=event.case_id,
                case_number=case_number,
                task_id=event.task_id,
                requester=event.requester or (case.get("requester") or {}).get("reference"),
                requester_org=event.requester_org or _org_id(recipient),
                provider=provider_ref,
                subject=f"Invoice/{invoice.res_id}",
                detail={
                    "invoice_number": number,
                    "amount": money(price.total, price.currency),
                    "recipient": recipient,
                    "charge_item": f"ChargeItem/{charge.res_id}",
                },
            ),
        )
        return invoice

    def _recipient(self, tx: Tx, case: dict[str, Any], event: CaseEvent) -> str:
        """Who pays: the requester's Organization, or the Patient for a self-request.

        A requester that is a PractitionerRole pays through its organization; a Practitioner
        without one, or a case without requester, is billed to the patient.
        """
        if event.requester_org:
            return f"Organization/{event.requester_org.split('/')[-1]}"
        requester = (case.get("requester") or {}).get("reference")
        parts = _ref_parts(requester)
        if parts is not None:
            rtype, _ = parts
            if rtype in ("Organization", "Patient", "RelatedPerson"):
                return str(requester)
            if rtype == "PractitionerRole":
                org = ((_live(tx, requester) or {}).get("organization") or {}).get("reference")
                if _ref_parts(org) and org.startswith("Organization/"):
                    return str(org)
        return str((case.get("subject") or {}).get("reference") or "")

    def _charge_item(
        self,
        event: CaseEvent,
        case: dict[str, Any],
        provider_ref: str | None,
        provider: dict[str, Any] | None,
        recipient: str,
        price: Price,
    ) -> dict[str, Any]:
        now = _now()
        item: dict[str, Any] = {
            "resourceType": "ChargeItem",
            "extension": [case_extension(event.case_id)],
            "definitionCanonical": [price.definition],
            "status": "billable",
            "code": codes.concept(
                codes.CASE_CATEGORY_SYSTEM, codes.CASE_CATEGORY_SECOND_OPINION, "Second opinion"
            ),
            "subject": {"reference": (case.get("subject") or {}).get("reference")},
            "occurrenceDateTime": now,
        }
        if provider_ref:
            item["performer"] = [{"actor": {"reference": provider_ref}}]
        performing_org = ((provider or {}).get("organization") or {}).get("reference")
        if performing_org:
            item["performingOrganization"] = {"reference": performing_org}
        if recipient.startswith("Organization/"):
            item["requestingOrganization"] = {"reference": recipient}
        item["quantity"] = {"value": 1}
        item["priceOverride"] = money(price.total, price.currency)
        item["overrideReason"] = (
            f"Priced by ChargeItemDefinition {price.definition} (priority {price.priority})"
        )
        item["enteredDate"] = now
        for report in (event.subject, event.detail.get("report")):
            if isinstance(report, str) and report.startswith("DiagnosticReport/"):
                item["service"] = [{"reference": report}]
                break
        return item

    def _invoice(
        self,
        case_id: str,
        case: dict[str, Any],
        recipient: str,
        charge_id: str,
        price: Price,
        number: str,
    ) -> dict[str, Any]:
        total = money(price.total, price.currency)
        return {
            "resourceType": "Invoice",
            "extension": [case_extension(case_id)],
            "identifier": [{"system": codes.INVOICE_NUMBER_SYSTEM, "value": number}],
            "status": "issued",
            "subject": {"reference": (case.get("subject") or {}).get("reference")},
            "recipient": {"reference": recipient},
            "date": _now(),
            "lineItem": [
                {
                    "sequence": 1,
                    "chargeItemReference": {"reference": f"ChargeItem/{charge_id}"},
                    "priceComponent": price.components,
                }
            ],
            "totalNet": total,
            "totalGross": total,
        }

    # -- payment ---------------------------------------------------------------------------

    def record_payment(
        self,
        tx: Tx,
        invoice_id: str,
        *,
        amount: Decimal,
        currency: str | None = None,
        paid_on: str | None = None,
        reference: str | None = None,
        actor: Any = None,
    ) -> tuple[StoredResource, StoredResource]:
        """Record that ``invoice_id`` was paid: a PaymentNotice, the Invoice ``balanced``.

        Runs with ``tx``'s caller (who must be allowed to read the Invoice, create the
        PaymentNotice and update the Invoice). Returns ``(payment_notice, invoice)``.
        """
        stored = tx.read("Invoice", invoice_id)
        invoice = stored.resource
        status = invoice.get("status")
        if status != "issued":
            raise FhirError(
                409,
                "business-rule",
                f"Invoice/{invoice_id} is '{status}': only an issued invoice can be paid",
                code="MSO-BILL-004",
            )
        total = invoice.get("totalGross") or {}
        expected = _decimal(total.get("value"))
        case_id = case_of(invoice)
        if expected is None or case_id is None:
            raise FhirError(
                409,
                "business-rule",
                f"Invoice/{invoice_id} has no total or no case: not issued by the MSO platform",
                code="MSO-BILL-006",
            )
        currency = currency or total.get("currency")
        if amount != expected or currency != total.get("currency"):
            raise FhirError(
                422,
                "business-rule",
                f"The payment ({amount} {currency}) is not the invoice total "
                f"({expected} {total.get('currency')})",
                code="MSO-BILL-005",
                expression=["Parameters.parameter.where(name='amount')"],
            )
        payment: dict[str, Any] = {"display": f"Payment {reference}" if reference else "Payment"}
        if reference:
            payment["identifier"] = {"value": reference}
        notice = tx.create(
            {
                "resourceType": "PaymentNotice",
                "extension": [case_extension(case_id)],
                "status": "active",
                "request": {"reference": f"Invoice/{invoice_id}"},
                "created": _now(),
                "payment": payment,
                "paymentDate": paid_on or datetime.now(UTC).date().isoformat(),
                "recipient": {"display": PLATFORM_DISPLAY},
                "amount": dict(total),
                "paymentStatus": codes.concept(PAYMENT_STATUS_SYSTEM, "paid", "Paid"),
            }
        )
        balanced = {k: v for k, v in invoice.items() if k != "meta"}
        balanced["status"] = "balanced"
        updated, _ = tx.update("Invoice", invoice_id, balanced, if_match=stored.version)
        with tx.internal():
            case = _live(tx, f"ServiceRequest/{case_id}") or {}
        recipient = (invoice.get("recipient") or {}).get("reference")
        self.events.emit(
            tx,
            CaseEvent(
                kind=CaseEventKind.INVOICE_PAID,
                case_id=case_id,
                case_number=case_number_of(case),
                actor=actor,
                requester=(case.get("requester") or {}).get("reference"),
                requester_org=_org_id(recipient),
                provider=_performer(case),
                subject=f"Invoice/{invoice_id}",
                detail={
                    "payment_notice": f"PaymentNotice/{notice.res_id}",
                    "amount": dict(total),
                    "recipient": recipient,
                },
            ),
        )
        return notice, updated


def _performer(case: dict[str, Any]) -> str | None:
    for performer in case.get("performer") or ():
        ref = (performer or {}).get("reference") or ""
        if ref.startswith("PractitionerRole/"):
            return ref
    return None


def _org_id(reference: str | None) -> str | None:
    if reference and reference.startswith("Organization/"):
        return reference.split("/", 1)[1]
    return None


def _invoice_number(case_number: str, earlier: int) -> str:
    """``INV-<case number without CASE->``, with ``-2``, ``-3`` … for re-issued invoices."""
    number = "INV-" + case_number.removeprefix("CASE-")
    return number if earlier == 0 else f"{number}-{earlier + 1}"
