"""The requester's feedback on a completed case (issue 5, step 7).

DESIGN.md: feedback is a QuestionnaireResponse to the MSO feedback Questionnaire
(:data:`~fhir_server.codes.FEEDBACK_QUESTIONNAIRE`: a rating 1 to 5, required, and
optional comments), ``basedOn`` the case ServiceRequest. The rules, enforced by guards (rows of
:mod:`fhir_server.workflow.guards`) on every write path (server work, ``caller`` ``None``,
passes):

* only the case's requester side gives feedback (:func:`fhir_server.workflow.status.parties_of`;
  403 for the provider, admins and anyone else who sees the case);
* only once the case is Done (409), and once per case (409 for a second, checked under a lock so
  two concurrent submissions cannot both be stored);
* the answers are checked against the Questionnaire's items
  (http://hl7.org/fhir/R4/questionnaireresponse.html, invariants of Questionnaire.item): every
  answered ``linkId`` exists, required items are answered, the value type fits the item type,
  ``answerOption`` lists the allowed values, ``minValue`` / ``maxValue`` / ``maxLength`` bound
  them, only ``repeats`` items take several answers (422 listing every problem);
* the response is ``completed``; the server fills in ``subject`` (the case), ``author`` (the
  caller's FHIR user) and ``authored`` when absent;
* feedback is final: a case's feedback is neither changed nor deleted through the API (409).

Emits ``FEEDBACK`` (subject: the QuestionnaireResponse, detail: the rating).

Errors (stable codes): ``MSO-FEEDBACK-403`` not the case's requester; ``MSO-FEEDBACK-409`` the
case is not Done; ``MSO-FEEDBACK-410`` the case has feedback already; ``MSO-FEEDBACK-411``
feedback changed or deleted; ``MSO-FEEDBACK-422`` not a case, or invalid answers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from fhir_server.codes import FEEDBACK_QUESTIONNAIRE, CaseStatus, FeedbackItem
from fhir_server.fhir.outcome import FhirError, Issue
from fhir_server.hooks import HookEvent
from fhir_server.storage.repository import format_instant, utc_now
from fhir_server.workflow.cases import current, is_case_request, state_of_case
from fhir_server.workflow.events import CaseEventKind, CaseEvents, case_event
from fhir_server.workflow.status import CaseState, Party, parties_of, ref_id

if TYPE_CHECKING:
    from fhir_server.storage.repository import Tx

INVALID = "MSO-FEEDBACK-422"
EXT_MIN_VALUE = "http://hl7.org/fhir/StructureDefinition/minValue"
EXT_MAX_VALUE = "http://hl7.org/fhir/StructureDefinition/maxValue"

ANSWER_TYPES: dict[str, tuple[str, ...]] = {
    "boolean": ("valueBoolean",),
    "decimal": ("valueDecimal",),
    "integer": ("valueInteger",),
    "date": ("valueDate",),
    "dateTime": ("valueDateTime",),
    "time": ("valueTime",),
    "string": ("valueString",),
    "text": ("valueString",),
    "url": ("valueUri",),
    "choice": ("valueCoding", "valueString", "valueInteger", "valueDate", "valueTime"),
    "open-choice": ("valueCoding", "valueString", "valueInteger", "valueDate", "valueTime"),
    "attachment": ("valueAttachment",),
    "reference": ("valueReference",),
    "quantity": ("valueQuantity",),
}
"""The ``answer.value[x]`` each Questionnaire item type takes (R4 ``item-type`` value set)."""
NO_ANSWER_TYPES = frozenset({"group", "display"})


def _canonical(value: Any) -> str:
    """A canonical URL without its ``|version``."""
    return value.split("|", 1)[0] if isinstance(value, str) else ""


def is_feedback(body: dict[str, Any] | None) -> bool:
    """A QuestionnaireResponse to the MSO feedback Questionnaire (any version)."""
    return bool(body) and _canonical((body or {}).get("questionnaire")) == FEEDBACK_QUESTIONNAIRE


# -- answers against the Questionnaire --------------------------------------------------------


def _value(answer: dict[str, Any]) -> tuple[str, Any] | None:
    return next(((k, v) for k, v in (answer or {}).items() if k.startswith("value")), None)


def _comparable(key: str, value: Any) -> Any:
    if key == "valueCoding" and isinstance(value, dict):
        return (value.get("system"), value.get("code"))
    if key in ("valueInteger", "valueDecimal") and not isinstance(value, bool):
        return Decimal(str(value))
    return value


def _bound(item: dict[str, Any], url: str) -> tuple[str, Any] | None:
    ext = next((e for e in item.get("extension") or () if (e or {}).get("url") == url), None)
    return _value(ext) if ext else None


def _check_answer(item: dict[str, Any], answer: dict[str, Any], path: str) -> list[str]:
    """Problems with one answer to ``item`` (type, allowed options, bounds)."""
    kind = item.get("type") or ""
    found = _value(answer)
    if found is None:
        return [f"{path}: an answer without a value"]
    key, value = found
    allowed = ANSWER_TYPES.get(kind, ())
    if key not in allowed:
        wanted = " or ".join(allowed) or "no answer"
        return [f"{path}: item '{item.get('linkId')}' is of type {kind} and takes {wanted}"]
    problems: list[str] = []
    options = [opt for o in item.get("answerOption") or () if (opt := _value(o)) is not None]
    if options and not (kind == "open-choice" and key == "valueString"):
        choices = {(k, _comparable(k, v)) for k, v in options}
        if (key, _comparable(key, value)) not in choices:
            shown = ", ".join(str(v if k != "valueCoding" else v.get("code")) for k, v in options)
            problems.append(f"{path}: the answer is not one of the allowed answers ({shown})")
    low, high = _bound(item, EXT_MIN_VALUE), _bound(item, EXT_MAX_VALUE)
    if low is not None and low[0] == key and _comparable(key, value) < _comparable(*low):
        problems.append(f"{path}: the answer is below the minimum {low[1]!r}")
    if high is not None and high[0] == key and _comparable(key, value) > _comparable(*high):
        problems.append(f"{path}: the answer is above the maximum {high[1]!r}")
    max_length = item.get("maxLength")
    if isinstance(value, str) and isinstance(max_length, int) and len(value) > max_length:
        problems.append(f"{path}: longer than {max_length} characters")
    return problems


def answer_problems(
    items: list[dict[str, Any]], answered: list[dict[str, Any]], path: str = "item"
) -> list[str]:
    """Problems of the response items ``answered`` against the Questionnaire ``items``."""
    problems: list[str] = []
    by_link = {i.get("linkId"): i for i in items}
    given: dict[str, list[dict[str, Any]]] = {}
    for index, entry in enumerate(answered):
        link = (entry or {}).get("linkId")
        where = f"{path}[{index}]"
        item = by_link.get(link)
        if item is None:
            problems.append(f"{where}: no item '{link}' in the questionnaire")
            continue
        given.setdefault(link, []).append(entry)
        answers = entry.get("answer") or []
        if item.get("type") in NO_ANSWER_TYPES and answers:
            problems.append(f"{where}: item '{link}' is a {item.get('type')} and takes no answer")
        if len(answers) > 1 and not item.get("repeats"):
            problems.append(f"{where}: item '{link}' takes one answer")
        for number, answer in enumerate(answers):
            problems += _check_answer(item, answer, f"{where}.answer[{number}]")
        problems += answer_problems(item.get("item") or [], entry.get("item") or [], where)
    for link, item in by_link.items():
        if len(given.get(link, [])) > 1 and not item.get("repeats"):
            problems.append(f"{path}: item '{link}' appears more than once")
        answered_here = any(e.get("answer") or e.get("item") for e in given.get(link, []))
        if item.get("required") and not answered_here:
            problems.append(f"{path}: item '{link}' is required")
    return problems


@functools.cache
def packaged_questionnaire(url: str) -> dict[str, Any] | None:
    """The Questionnaire ``url`` as shipped in ``profiles/`` (read once per process)."""
    from fhir_server.conformance import read_resources

    return next(
        (r.resource for r in read_resources() if r.res_type == "Questionnaire" and r.url == url),
        None,
    )


def questionnaire_of(tx: Tx, url: str) -> dict[str, Any]:
    """The Questionnaire ``url``: the stored one (as served), else the packaged file."""
    with tx.internal():
        stored = tx.find("Questionnaire", [("url", url)], limit=1)
    if stored:
        return stored[0].resource
    found = packaged_questionnaire(url)
    if found is None:
        raise FhirError(500, "exception", f"Questionnaire {url} is not installed")
    return found


def check_answers(questionnaire: dict[str, Any], response: dict[str, Any]) -> None:
    """422 listing every problem of ``response``'s answers against ``questionnaire``."""
    problems = answer_problems(questionnaire.get("item") or [], response.get("item") or [])
    if response.get("status") != "completed":
        problems.insert(0, "status: feedback is submitted 'completed'")
    if not problems:
        return
    issues = [
        Issue("error", "business-rule", p, ["QuestionnaireResponse." + p.split(":")[0]], INVALID)
        for p in problems
    ]
    raise FhirError(
        422,
        "business-rule",
        f"The feedback does not fit the questionnaire: {problems[0]}",
        code=INVALID,
        issues=issues,
    )


def rating_of(response: dict[str, Any]) -> int | None:
    """The rating answered in a feedback QuestionnaireResponse."""
    for item in response.get("item") or ():
        if (item or {}).get("linkId") == FeedbackItem.RATING:
            for answer in item.get("answer") or ():
                if isinstance(answer.get("valueInteger"), int):
                    return answer["valueInteger"]
    return None


# -- the rules ----------------------------------------------------------------------------------


def case_id_of(response: dict[str, Any]) -> str | None:
    """The ServiceRequest a QuestionnaireResponse is ``basedOn``."""
    return next(
        (cid for b in response.get("basedOn") or () if (cid := ref_id(b, "ServiceRequest"))),
        None,
    )


def case_of(tx: Tx, response: dict[str, Any]) -> CaseState:
    """The case a feedback is ``basedOn`` (404 unless the caller sees it, 422 if no case)."""
    case_id = case_id_of(response)
    if case_id is None:
        raise FhirError(
            422,
            "required",
            "Feedback is basedOn the case (its ServiceRequest)",
            code=INVALID,
            expression=["QuestionnaireResponse.basedOn"],
        )
    tx.read("ServiceRequest", case_id)  # 404 unless the caller sees the case
    request = current(tx, "ServiceRequest", case_id)
    case = state_of_case(tx, case_id)
    if request is None or not is_case_request(request.resource) or case is None:
        raise FhirError(
            422,
            "business-rule",
            f"ServiceRequest/{case_id} is not a submitted case",
            code=INVALID,
            expression=["QuestionnaireResponse.basedOn"],
        )
    return case


def check_feedback(tx: Tx, case: CaseState, response: dict[str, Any], *, caller: Any) -> None:
    """Who, when and how often: the requester, once the case is Done, once per case."""
    if Party.REQUESTER not in parties_of(caller, case):
        raise FhirError(
            403,
            "forbidden",
            f"Only the requester of case {case.case_number} gives feedback on it",
            code="MSO-FEEDBACK-403",
        )
    if case.status is not CaseStatus.DONE:
        raise FhirError(
            409,
            "business-rule",
            f"Case {case.case_number} is '{case.status.value}': feedback is given once the "
            "case is done",
            code="MSO-FEEDBACK-409",
        )
    based_on = f"ServiceRequest/{case.case_id}"
    tx.lock_criteria("QuestionnaireResponse", [("based-on", based_on), ("feedback", "true")])
    with tx.internal():
        earlier = tx.find("QuestionnaireResponse", [("based-on", based_on)])
    if any(is_feedback(r.resource) for r in earlier):
        raise FhirError(
            409,
            "duplicate",
            f"Case {case.case_number} has feedback already (one per case)",
            code="MSO-FEEDBACK-410",
        )


# -- hooks ---------------------------------------------------------------------------------------


@dataclass
class Feedback:
    """The guards holding feedback QuestionnaireResponses to the rules (rows of
    :mod:`fhir_server.workflow.guards`; callers' writes only)."""

    events: CaseEvents

    def check_new(self, event: HookEvent) -> None:
        """Before a caller creates feedback: who, when, once, and the answers."""
        tx, caller, body = event.tx, event.caller, event.resource or {}
        case = case_of(tx, body)
        check_feedback(tx, case, body, caller=caller)
        check_answers(questionnaire_of(tx, FEEDBACK_QUESTIONNAIRE), body)
        body.setdefault("subject", {"reference": f"ServiceRequest/{case.case_id}"})
        author = getattr(caller, "fhir_user", None)
        if author:
            body.setdefault("author", {"reference": author})
        body.setdefault("authored", format_instant(utc_now()))

    def given(self, event: HookEvent) -> None:
        """After feedback is stored: the FEEDBACK event."""
        body = event.resource or {}
        case = state_of_case(event.tx, case_id_of(body) or "")
        if case is None:
            return
        detail: dict[str, Any] = {"rating": rating_of(body)}
        subject = f"QuestionnaireResponse/{event.resource_id}"
        self.events.emit(
            event.tx,
            case_event(
                CaseEventKind.FEEDBACK, case, actor=event.caller, subject=subject, detail=detail
            ),
        )

    def final(self, event: HookEvent) -> None:
        """Feedback is neither changed nor deleted."""
        raise FhirError(
            409,
            "business-rule",
            "Feedback on a case is final: it is neither changed nor deleted",
            code="MSO-FEEDBACK-411",
        )
