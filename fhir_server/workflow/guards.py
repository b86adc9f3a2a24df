"""The workflow's guards, in one table: which writes of which resources each rule holds.

The MSO rules (DESIGN.md: the case status table, case documents, case issues, appointments,
feedback, amended recommendations, the case chat, Subscriptions) hold on every write path
because the repository fires its hooks on every path — single REST writes, transaction and
batch Bundle entries, PATCH, the operations' own writes — and :class:`Guards` is registered
once at each write hook point.
For each write it runs, in table order, every row whose resource kind matches:

* ``kind``: a predicate on the write (resource type and content, new or previous);
* ``write``: the hook point — ``create`` (before the first version is stored: may change the
  resource or refuse it), ``created`` (after: it has its id), ``update``, ``delete``;
* ``guard``: the rule, which refuses with a :class:`~fhir_server.fhir.outcome.FhirError` or
  completes the resource; the decisions on a case's status are made by the pure state machine
  :mod:`fhir_server.workflow.status`, which every guard and operation calls;
* ``server_too``: whether the server's own writes (``caller`` ``None``: the workflow's
  transitions, seeding, imports) are held to it too; otherwise they pass.

Rules spanning several resources of one unit (a document, its Binary and its case, which a
transaction Bundle may hold in any order) defer their check to the end of the unit
(:meth:`Tx.defer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fhir_server.auth.resource_kinds import is_chat
from fhir_server.hooks import HookEvent, HookPoint
from fhir_server.messaging import chat
from fhir_server.messaging.subscriptions import SubscriptionRules
from fhir_server.workflow import amendments, documents, security_labels
from fhir_server.workflow.cases import is_case_request
from fhir_server.workflow.feedback import is_feedback
from fhir_server.workflow.status import is_case_task, is_issue_task

if TYPE_CHECKING:
    from fhir_server.hooks import Hooks
    from fhir_server.workflow.appointments import Appointments
    from fhir_server.workflow.feedback import Feedback
    from fhir_server.workflow.service import Workflow

Kind = Callable[[HookEvent], bool]
"""Which resources a row is about (sees the new and the previous content)."""
Guard = Callable[[HookEvent], None]
"""A rule: refuses the write (``FhirError``) or completes the resource."""

CREATE = HookPoint.BEFORE_CREATE
CREATED = HookPoint.AFTER_CREATE
UPDATE = HookPoint.BEFORE_UPDATE
DELETE = HookPoint.BEFORE_DELETE
WRITE_POINTS = (CREATE, CREATED, UPDATE, DELETE)


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the guard table."""

    kind: Kind
    write: HookPoint
    guard: Guard
    server_too: bool = False


# -- resource kinds ------------------------------------------------------------------------------


def _either(event: HookEvent, test: Callable[[dict | None], bool]) -> bool:
    return test(event.resource) or test(event.previous)


def of_type(res_type: str) -> Kind:
    """Every resource of ``res_type``."""
    return lambda event: event.resource_type == res_type


def case_request(event: HookEvent) -> bool:
    """A case: a ServiceRequest of category second-opinion (new or previous content)."""
    return event.resource_type == "ServiceRequest" and _either(event, is_case_request)


def case_task(event: HookEvent) -> bool:
    """A case's workflow Task (Task.code ``case``)."""
    return event.resource_type == "Task" and _either(event, is_case_task)


def case_issue(event: HookEvent) -> bool:
    """A case-issue Task (Task.code ``case-issue``) that is not also a case Task."""
    return event.resource_type == "Task" and not case_task(event) and _either(event, is_issue_task)


def case_document(event: HookEvent) -> bool:
    """A DocumentReference linked to a case (``context.related``) or claiming the profile."""
    return event.resource_type == "DocumentReference" and _either(
        event, lambda body: bool(body) and documents.is_case_document(body or {})
    )


def feedback(event: HookEvent) -> bool:
    """A QuestionnaireResponse to the MSO feedback Questionnaire."""
    return event.resource_type == "QuestionnaireResponse" and _either(event, is_feedback)


def chat_message(event: HookEvent) -> bool:
    """A case chat message: a Communication basedOn a case (new or previous content: no
    write turns another Communication into one, nor one into another)."""
    return event.resource_type == "Communication" and _either(event, chat.is_chat_message)


def chat_attachment(event: HookEvent) -> bool:
    """A Binary that is chat content (its security context is a chat message) already."""
    return event.resource_type == "Binary" and is_chat("Binary", event.previous or {})


# -- the table -----------------------------------------------------------------------------------


def guard_table(workflow: Workflow, appointments: Appointments, feedbacks: Feedback) -> list[Row]:
    """Every workflow guard, in the order they run for one write."""
    w, a, f = workflow, appointments, feedbacks
    c = chat.ChatRules(blobs=workflow.blobs, events=workflow.events)
    s = SubscriptionRules(workflow.settings)
    # fmt: off
    return [
        # kind                          write    guard                     server too
        Row(of_type("DiagnosticReport"), UPDATE, amendments.guard_update,  server_too=True),
        Row(of_type("DiagnosticReport"), DELETE, amendments.guard_delete,  server_too=True),
        Row(case_request,                CREATE, w.submit_case,            server_too=True),
        Row(case_request,                CREATED, w.open_case,             server_too=True),
        Row(case_request,                CREATED, w.documents_linked),
        Row(case_request,                UPDATE, w.request_written),
        Row(case_request,                UPDATE, w.documents_linked),
        Row(case_request,                DELETE, w.case_deleted),
        Row(of_type("Task"),             CREATE, w.new_task),
        Row(case_task,                   UPDATE, w.case_task_written),
        Row(case_task,                   DELETE, w.case_deleted),
        Row(case_issue,                  CREATED, w.issue_reported),
        Row(case_issue,                  UPDATE, w.issue_written),
        Row(case_issue,                  DELETE, w.issue_deleted),
        Row(of_type("DocumentReference"), CREATED, w.document_created),
        Row(of_type("DocumentReference"), UPDATE, w.document_written),
        Row(case_document,               DELETE, w.document_deleted),
        Row(of_type("Binary"),           UPDATE, w.binary_written),
        Row(of_type("Binary"),           DELETE, w.binary_written),
        Row(of_type("Appointment"),      CREATE, a.propose),
        Row(of_type("Appointment"),      CREATED, a.proposed),
        Row(of_type("Appointment"),      UPDATE, a.appointment_written),
        Row(of_type("Appointment"),      DELETE, a.appointment_deleted),
        Row(of_type("AppointmentResponse"), CREATE, a.answer),
        Row(of_type("AppointmentResponse"), UPDATE, a.answer_changed),
        Row(of_type("AppointmentResponse"), DELETE, a.answer_changed),
        Row(feedback,                    CREATE, f.check_new),
        Row(feedback,                    CREATED, f.given),
        Row(feedback,                    UPDATE, f.final),
        Row(feedback,                    DELETE, f.final),
        Row(chat_message,                CREATE, c.send),
        Row(chat_message,                CREATED, c.sent),
        Row(chat_message,                UPDATE, chat.refuse_change, server_too=True),
        Row(chat_message,                DELETE, chat.refuse_change, server_too=True),
        Row(chat_attachment,             UPDATE, chat.refuse_change, server_too=True),
        Row(chat_attachment,             DELETE, chat.refuse_change, server_too=True),
        Row(of_type("Subscription"),     CREATE, s.accept),
        Row(of_type("Subscription"),     UPDATE, s.accept),
        Row(of_type("Subscription"),     CREATED, s.own),
        Row(security_labels.labelled,    CREATE, security_labels.guard_label),
        Row(security_labels.labelled,    UPDATE, security_labels.guard_label),
    ]
    # fmt: on


class Guards:
    """Runs the rows of a guard table for every write (registered once per write hook point)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = tuple(rows)
        self._by_point = {p: tuple(r for r in rows if r.write is p) for p in WRITE_POINTS}

    def install(self, hooks: Hooks) -> None:
        """Register :meth:`run` at each write hook point."""
        for point in WRITE_POINTS:
            if self._by_point[point]:
                hooks.register(point, self.run)

    def run(self, event: HookEvent) -> None:
        """Run every row of ``event``'s hook point whose kind matches, in table order."""
        server = event.caller is None
        for row in self._by_point.get(event.point, ()):
            if (row.server_too or not server) and row.kind(event):
                row.guard(event)
