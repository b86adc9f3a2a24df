"""Case chat: a message is a ``Communication`` between a case's requester and its provider.

DESIGN.md (FHIR model: chat message; Chat and live updates), the MSO chat rules (only the
case's requester and provider, never admins; messages immutable; attachments checked) and
http://hl7.org/fhir/R4/communication.html; profile
:data:`~fhir_server.codes.PROFILE_CHAT_MESSAGE`.

A chat message is a Communication ``basedOn`` a case ServiceRequest: the same test the access
policy applies (:func:`fhir_server.auth.resource_kinds.is_chat`), which hides it from admins
on every read path. Its rules are rows of the one guard table
(:mod:`fhir_server.workflow.guards`), so they hold on every write path (REST, PATCH,
conditional interactions, transaction and batch entries):

* **sending** (:meth:`ChatRules.send`, before the first version is stored): only a party of the
  case — its requester side or the provider currently assigned to it, as
  :func:`fhir_server.workflow.status.parties_of` decides — writes in its chat, as a user with
  a FHIR identity (403 ``MSO-CHAT-403``). The server sets ``category`` chat, ``sender`` (the
  user's fhirUser, displayed as "name (Requester|Provider)"), ``recipient`` (the other party;
  none yet, before assignment or after a rejection, is a 409 ``MSO-CHAT-409``), ``sent`` (a
  client value is overwritten: no backdating), ``subject`` (the case's patient) and the
  profile. A message that is not ``basedOn`` exactly one case, names another ``sender``,
  ``recipient`` or ``subject``, another category, a ``status`` other than ``completed``, or
  has a payload that is not text or an attachment is a 422 ``MSO-CHAT-422``;
* **attachments** (:meth:`ChatRules.sent`, checked when the unit's entries are all written,
  so a Binary later in a transaction Bundle counts): type by content and size exactly as for
  case documents (:func:`fhir_server.workflow.documents.check_attachment`: ``MSO-DOC-421``
  type, ``MSO-DOC-422`` size, ``MSO-DOC-424`` content missing or not readable by the sender);
  a raw-uploaded Binary gets the message as its security context
  (:func:`fhir_server.workflow.documents.secure_binaries`), so the other party may read it and
  admins may not;
* **notification** (:func:`message_event`): every message is a case event
  (``chat-message``) telling the other party — an in-app notification "New message from
  <sender> on case CASE-…" and, for a recipient who is offline, an email at the first message
  of a conversation burst only (:func:`starts_burst`, ``MSO_CHAT_EMAIL_QUIET_SECONDS``), with
  no message text unless ``MSO_CHAT_EMAIL_SNIPPET_CHARS`` asks for a snippet
  (:func:`email_text`);
* **immutability** (:func:`refuse_change`): neither a message nor the Binary attached to it is
  ever updated or deleted, by anyone, the server included — PUT, PATCH, DELETE, conditional
  or inside a Bundle, a status change such as ``entered-in-error`` — 405 ``MSO-CHAT-405``
  (a transaction holding such an entry fails as a whole); a message's history has one version.

Thread order is the server's ``sent``, ties broken by storage order (``resource.pid``), as
``Communication?based-on=…&_sort=sent`` orders (:mod:`.thread`). It is stable under
concurrent posts: a message is stamped while its sender holds the lock on the case's
ServiceRequest row, at least a millisecond after the case's latest message, so a message
committed later never sorts before one committed earlier (and no two messages of a case sent
through these rules tie). What each user has read: :mod:`.read_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from fhir_server.auth.principal import Principal
from fhir_server.auth.resource_kinds import is_chat
from fhir_server.codes import (
    COMMUNICATION_CATEGORY_SYSTEM,
    COMMUNICATION_CHAT,
    PROFILE_CHAT_MESSAGE,
    CaseStatus,
    concept,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging import thread
from fhir_server.storage.repository import format_instant, utc_now
from fhir_server.workflow import documents
from fhir_server.workflow.cases import current, state_of_case
from fhir_server.workflow.events import CaseEvent, CaseEventKind, CaseEvents, case_event
from fhir_server.workflow.status import CaseState, Party, parties_of, ref_id

if TYPE_CHECKING:
    from fhir_server.hooks import HookEvent
    from fhir_server.storage.blobs import BlobStore
    from fhir_server.storage.repository import Tx

_PARTY_LABEL = {Party.REQUESTER: "Requester", Party.PROVIDER: "Provider"}
_CHAT_CATEGORY = concept(COMMUNICATION_CATEGORY_SYSTEM, COMMUNICATION_CHAT, "Chat message")


# -- what a chat message is, and whose ----------------------------------------------------------


def is_chat_message(body: dict[str, Any] | None) -> bool:
    """A chat message: a Communication ``basedOn`` a case ServiceRequest."""
    return bool(body) and is_chat("Communication", body or {})


def case_of(body: dict[str, Any]) -> str | None:
    """The case (ServiceRequest id) a chat message is ``basedOn``; ``None`` unless it names
    exactly one reference, a ServiceRequest."""
    based = body.get("basedOn") or ()
    if not isinstance(based, list) or len(based) != 1:
        return None
    return ref_id(based[0], "ServiceRequest")


def chat_case(tx: Tx, case_id: str | None) -> CaseState | None:
    """The case ``case_id`` as the workflow sees it (``None``: no such case)."""
    return state_of_case(tx, case_id) if case_id else None


def chat_party(caller: Any, case: CaseState) -> Party | None:
    """``caller``'s side of ``case``'s chat: its assigned provider (not after rejecting it) or
    its requester side; ``None`` for anybody else — administrators and platform clients are
    never a party of a chat."""
    if not isinstance(caller, Principal):
        return None
    parties = parties_of(caller, case)
    if Party.ADMIN in parties:
        return None
    for party in (Party.PROVIDER, Party.REQUESTER):
        if party in parties:
            return party
    return None


def require_party(caller: Any, case: CaseState) -> Party:
    """:func:`chat_party`, or 403 ``MSO-CHAT-403``."""
    party = chat_party(caller, case)
    if party is None:
        raise FhirError(
            403,
            "forbidden",
            f"Only the requester and the assigned provider of case {case.case_number} take "
            "part in its chat",
            code="MSO-CHAT-403",
        )
    return party


def other_party(case: CaseState, party: Party) -> str | None:
    """The ``Type/id`` a message of ``party`` is addressed to (``None``: nobody yet)."""
    if party is Party.PROVIDER:
        return case.requester_ref
    if case.owner and case.status is not CaseStatus.REJECTED:
        return f"PractitionerRole/{case.owner}"
    return None


# -- the guards ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatRules:
    """The chat's guards (rows of :func:`fhir_server.workflow.guards.guard_table`).

    ``blobs`` is the blob store attachments uploaded as raw Binaries are read from.
    """

    blobs: BlobStore
    events: CaseEvents

    def send(self, event: HookEvent) -> None:
        """Before a caller's message is stored: its party, addressing, stamps (see module)."""
        tx, body, caller = event.tx, event.resource or {}, event.caller
        case = chat_case(tx, case_of(body))
        if case is None:
            raise _invalid(
                "A chat message is basedOn exactly one case (its ServiceRequest)",
                "Communication.basedOn",
            )
        party = require_party(caller, case)
        if not caller.fhir_user:
            raise FhirError(
                403,
                "forbidden",
                "Chat messages are written by users with a FHIR identity (fhirUser)",
                code="MSO-CHAT-403",
            )
        other = other_party(case, party)
        if other is None:
            raise FhirError(
                409,
                "business-rule",
                f"Case {case.case_number} has no other party yet: its chat opens when a "
                "provider is assigned",
                code="MSO-CHAT-409",
            )
        _check_message(body, sender=caller.fhir_user, recipient=other, subject=case.patient_ref)
        # one sender of a case at a time, each stamped after the one before
        with tx.internal():
            tx.current("ServiceRequest", case.case_id, for_update=True)
            last, previous = thread.latest_and_latest_to(tx, case.case_id, other)
        # for the after-hook of this same write (nothing changes the case in between)
        tx.unit_state[_STASH] = (case, previous)
        body["category"] = [_CHAT_CATEGORY]
        body["sender"] = {
            "reference": caller.fhir_user,
            "display": sender_display(tx, caller, party),
        }
        body["recipient"] = [{"reference": other}]
        if case.patient_ref:
            body["subject"] = {"reference": case.patient_ref}
        body["sent"] = _stamp(last)
        meta = dict(body.get("meta") or {})
        profiles = [p for p in meta.get("profile") or () if p != PROFILE_CHAT_MESSAGE]
        meta["profile"] = [PROFILE_CHAT_MESSAGE, *profiles]
        body["meta"] = meta

    def sent(self, event: HookEvent) -> None:
        """After a caller's message is stored: its attachments, checked once the whole unit
        is written (see module), and the :data:`CaseEventKind.CHAT_MESSAGE` event that
        notifies the other party."""
        body = event.resource or {}
        message_id = event.resource_id or body.get("id") or ""
        attachments = [
            (index, item["contentAttachment"])
            for index, item in enumerate(body.get("payload") or ())
            if isinstance(item, dict) and isinstance(item.get("contentAttachment"), dict)
        ]
        if attachments:
            event.tx.defer(partial(self._attachments, event.tx, message_id, attachments))
        stash = event.tx.unit_state.pop(_STASH, None)
        case, previous = stash if stash else (chat_case(event.tx, case_of(body)), _UNKNOWN)
        if case is not None:
            news = message_event(event.tx, case, event.caller, message_id, body, previous)
            self.events.emit(event.tx, news)

    def _attachments(
        self, tx: Tx, message_id: str, attachments: list[tuple[int, dict[str, Any]]]
    ) -> None:
        reader = documents.ContentReader(tx, self.blobs)
        for index, attachment in attachments:
            documents.check_attachment(
                attachment,
                reader,
                name=f"Communication/{message_id} payload[{index}]",
                where=f"Communication.payload[{index}].contentAttachment",
            )
        documents.secure_binaries(tx, [a for _, a in attachments], f"Communication/{message_id}")


def message_event(
    tx: Tx,
    case: CaseState,
    caller: Any,
    message_id: str,
    body: dict[str, Any],
    previous: thread.Position | object | None = None,
) -> CaseEvent:
    """The case event of a new message: its sender's display, its own ``sent`` and that of
    the case's previous message to the same recipient (epoch ms; where a conversation burst
    starts, :func:`starts_burst`; ``previous`` when the caller knows it, else looked up) and
    its first text (quoted in emails only as far as ``MSO_CHAT_EMAIL_SNIPPET_CHARS`` says)."""
    recipient = ((body.get("recipient") or [{}])[0] or {}).get("reference")
    if previous is _UNKNOWN:
        with tx.internal():
            previous = thread.latest(tx, case.case_id, recipient=recipient, other_than=message_id)
    assert previous is None or isinstance(previous, thread.Position)
    texts = [
        item["contentString"]
        for item in body.get("payload") or ()
        if isinstance(item, dict) and isinstance(item.get("contentString"), str)
    ]
    sent = datetime.fromisoformat(str(body.get("sent")).replace("Z", "+00:00"))
    return case_event(
        CaseEventKind.CHAT_MESSAGE,
        case,
        actor=caller,
        subject=f"Communication/{message_id}",
        detail={
            "sender": ((body.get("sender") or {}).get("display")) or "",
            "sent_ms": int(sent.timestamp() * 1000),
            "previous_ms": previous.ms if previous is not None else None,
            "text": texts[0] if texts else "",
        },
    )


_STASH = "chat.send"
"""unit_state key: the case and the previous message to the recipient, from the before-hook
of a message's write to its after-hook."""
_UNKNOWN = object()


def starts_burst(event: CaseEvent, quiet_seconds: float) -> bool:
    """Whether the chat message of ``event`` starts a conversation burst for its recipient:
    no earlier message to the same side, or the latest one ``quiet_seconds`` before or more.
    An offline recipient is emailed once a burst, at its first message."""
    previous, sent = event.detail.get("previous_ms"), event.detail.get("sent_ms")
    if previous is None or sent is None:
        return True
    return int(sent) - int(previous) >= quiet_seconds * 1000


def email_text(event: CaseEvent, text: str, snippet_chars: int) -> str:
    """A chat message's email text: the notice's ``text``, then the first ``snippet_chars``
    characters of the message's text when that is set (0 by default: none)."""
    quoted = str(event.detail.get("text") or "").strip()
    if snippet_chars <= 0 or not quoted:
        return text
    cut = quoted[:snippet_chars] + ("…" if len(quoted) > snippet_chars else "")
    return f'{text}\n\n"{cut}"'


def _stamp(last: thread.Position | None) -> str:
    """``sent`` of a new message: now, but later than the case's latest message (``last``)
    by at least a millisecond, so that ``sent`` alone orders the messages of a case."""
    now = utc_now()
    if last is not None and now.timestamp() * 1000 < last.ms + 1:
        now = datetime.fromtimestamp((last.ms + 1) / 1000, UTC)
    return format_instant(now)


def refuse_change(event: HookEvent) -> None:
    """A chat message (or its attachment's Binary) is never updated or deleted: 405."""
    reference = f"{event.resource_type}/{event.resource_id}"
    what = "a chat message" if event.resource_type == "Communication" else "a chat attachment"
    raise FhirError(
        405,
        "not-supported",
        f"{reference} is {what}: once sent it is never changed or deleted",
        code="MSO-CHAT-405",
        headers={"Allow": "GET, HEAD"},
    )


# -- checks and the sender's display ------------------------------------------------------------


def _invalid(message: str, expression: str) -> FhirError:
    return FhirError(422, "business-rule", message, code="MSO-CHAT-422", expression=[expression])


def _check_message(
    body: dict[str, Any], *, sender: str, recipient: str, subject: str | None
) -> None:
    """422 for what the server would not set the same way, and for a bad payload; no error
    text quotes the message."""
    claimed = body.get("sender")
    if claimed is not None and (claimed or {}).get("reference") != sender:
        raise _invalid(
            "The sender of a chat message is the user sending it", "Communication.sender"
        )
    recipients = body.get("recipient")
    if recipients is not None and [(r or {}).get("reference") for r in recipients] != [recipient]:
        raise _invalid(
            "A chat message is addressed to the case's other party", "Communication.recipient"
        )
    about = body.get("subject")
    if about is not None and subject and (about or {}).get("reference") != subject:
        raise _invalid("A chat message is about the case's patient", "Communication.subject")
    for category in body.get("category") or ():
        codings = (category or {}).get("coding") or ()
        if not codings or any(
            (c or {}).get("system") != COMMUNICATION_CATEGORY_SYSTEM
            or (c or {}).get("code") != COMMUNICATION_CHAT
            for c in codings
        ):
            raise _invalid("A chat message has the category chat only", "Communication.category")
    if body.get("status") != "completed":
        raise _invalid("A chat message is sent with status completed", "Communication.status")
    payload = body.get("payload")
    if not isinstance(payload, list) or not payload:
        raise _invalid("A chat message has a payload: text or an attachment", "Communication")
    for index, item in enumerate(payload):
        where = f"Communication.payload[{index}]"
        text = (item or {}).get("contentString")
        attachment = (item or {}).get("contentAttachment")
        if "contentString" in (item or {}):
            if not isinstance(text, str) or not text.strip():
                raise _invalid("A text payload is not empty", f"{where}.contentString")
        elif not isinstance(attachment, dict):
            raise _invalid("A payload is text (contentString) or a file (contentAttachment)", where)


def sender_display(tx: Tx, caller: Principal, party: Party) -> str:
    """How a message shows its sender: "name (Requester)" or "name (Provider)". The name is
    the user's FHIR identity's (a PractitionerRole's practitioner), else the user name."""
    name = display_name(tx, caller.fhir_user or "") or caller.subject
    return f"{name} ({_PARTY_LABEL[party]})"


def display_name(tx: Tx, reference: str) -> str | None:
    """The name of the person ``reference`` (``Type/id``) is, as the server reads it."""
    res_type, _, res_id = reference.partition("/")
    found = current(tx, res_type, res_id) if res_type and "/" not in res_id else None
    if found is None:
        return None
    body = found.resource
    if res_type != "PractitionerRole":
        return human_name(body)
    practitioner = body.get("practitioner") or {}
    person = current(tx, "Practitioner", ref_id(practitioner, "Practitioner"))
    name = human_name(person.resource) if person is not None else None
    display = practitioner.get("display") if isinstance(practitioner, dict) else None
    return name or (display if isinstance(display, str) and display.strip() else None)


def human_name(body: dict[str, Any]) -> str | None:
    """The first usable ``name`` of a person resource: its ``text``, else prefix, given names
    and family name."""
    for name in body.get("name") or ():
        if not isinstance(name, dict):
            continue
        if isinstance(name.get("text"), str) and name["text"].strip():
            return name["text"].strip()
        parts = [*(name.get("prefix") or ()), *(name.get("given") or ()), name.get("family")]
        joined = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
        if joined:
            return joined
    return None
