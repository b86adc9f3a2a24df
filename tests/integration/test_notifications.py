"""Notifications (issue 5): in-app Communications and outbox emails for case events, delivered
by the outbox worker to a real SMTP server (aiosmtpd), on SQLite and PostgreSQL.

Events are emitted through ``CaseEvents.emit`` inside ``repo.write``, as the workflow does.
Each module run has its own database per backend with the users below; each test empties the
outbox (the worker drains all of it) and works on cases of its own.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import delete, select, update

from fhir_server.app import create_app
from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.scopes import ScopeSet
from fhir_server.auth.users import UserError, UserStore
from fhir_server.cli import main
from fhir_server.codes import COMMUNICATION_CATEGORY_SYSTEM
from fhir_server.config import Settings
from fhir_server.messaging import outbox
from fhir_server.messaging.notifications import USERNAME_SYSTEM, Notifier
from fhir_server.messaging.presence import forget_touches, touch_presence
from fhir_server.messaging.worker import MailWorker
from fhir_server.storage.engine import build_engine
from fhir_server.storage.messaging_schema import mail_outbox, user_presence
from fhir_server.storage.repository import Repository, utc_now
from fhir_server.wiring import build_repository
from fhir_server.workflow.events import CaseEvent, CaseEventKind, CaseEvents
from tests.conftest import BACKENDS, _make_db, make_settings
from tests.smtp_server import Collector, SmtpServer, body_of, free_port

K = CaseEventKind
CASE_NUMBER = "CASE-N0T1FY"
CLINICAL = "suspected malignant melanoma of the left forearm"
PUBLIC_URL = "https://mso.example.test"
NOTIFICATION = f"{COMMUNICATION_CATEGORY_SYSTEM}|notification"
PASSWORD = "correct horse battery"

# username: (role, practitioner_role, organization, patient, email, disabled)
USERS = {
    "admin1": ("admin", None, None, None, "admin1@example.test", False),
    "admin2": ("admin", None, None, None, None, False),
    "admin-off": ("admin", None, None, None, "off@example.test", True),
    "req": ("requester", "req-role", "org-1", None, "req@example.test", False),
    "req2": ("requester", "req-role-2", "org-1", None, "req2@example.test", False),
    "stranger": ("requester", "str-role", "org-2", None, "stranger@example.test", False),
    "prov": ("provider", "prov-role", "org-p", None, "prov@example.test", False),
    "prov2": ("provider", "prov-role-2", "org-p", None, "prov2@example.test", False),
    "pat": ("patient", None, None, "pat-1", "pat@example.test", False),
}


def principal(username: str) -> Principal:
    """The caller a user's token would make."""
    role, pr, org, patient, _, _ = USERS[username]
    fhir_user = f"PractitionerRole/{pr}" if pr else (f"Patient/{patient}" if patient else None)
    return Principal(
        subject=username,
        role=Role(role),
        scopes=ScopeSet.parse("user/*.cruds"),
        fhir_user=fhir_user,
        practitioner_role=pr,
        organization=org,
        patient=patient,
    )


@dataclass
class World:
    settings: Settings
    repo: Repository
    events: CaseEvents
    case_id: str = ""

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self.repo.engine

    def emit(self, kind: CaseEventKind, *, actor: str | None = None, **overrides: object) -> None:
        """Emit one event about the test case inside a write transaction."""
        values: dict = {
            "kind": kind,
            "case_id": self.case_id,
            "case_number": CASE_NUMBER,
            "task_id": "task-n1",
            "actor": principal(actor) if actor else None,
            "requester": "PractitionerRole/req-role",
            "requester_org": "Organization/org-1",
            "provider": "PractitionerRole/prov-role",
            "detail": {"reason": CLINICAL, "note": CLINICAL},
        }
        values.update(overrides)
        event = CaseEvent(**values)
        self.repo.write(lambda tx: self.events.emit(tx, event))

    def notifications(self, caller: object = None) -> list[dict]:
        """The notification Communications (visible to ``caller``; all when ``None``)."""
        params = [("category", NOTIFICATION), ("_count", "1000")]
        found = self.repo.read_only(lambda tx: tx.find("Communication", params), caller=caller)
        mine = f"ServiceRequest/{self.case_id}"
        return [
            s.resource
            for s in found
            if s.resource["about"][0]["reference"].startswith(mine)  # this test's cases
        ]

    def outbox_rows(self) -> list:
        with self.engine.connect() as conn:
            return conn.execute(select(mail_outbox).order_by(mail_outbox.c.id)).all()


def _settings(db_url: str, tmp_path, **overrides: object) -> Settings:
    values: dict = {
        "public_url": PUBLIC_URL,
        "smtp_starttls": False,
        "smtp_from": "MSO <notify@mso.example.test>",
        "smtp_timeout": 5.0,
        "smtp_retry_base": 0.3,
        "smtp_retry_max": 5.0,
        "smtp_max_attempts": 4,
        "mail_poll_interval": 0.05,
    }
    values.update(overrides)
    return make_settings(db_url, tmp_path, **values)


@pytest.fixture(scope="module", params=BACKENDS)
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A database for this module with the users of :data:`USERS`, its settings and repo."""
    tmp = tmp_path_factory.mktemp(f"notify-{request.param}")
    for db_url in _make_db(request.param, tmp):
        settings = _settings(db_url, tmp)
        repo = build_repository(settings)
        store = UserStore(repo.engine)
        for name, (role, pr, org, patient, mail, disabled) in USERS.items():
            store.create(
                username=name,
                password=PASSWORD,
                role=role,
                practitioner_role=pr,
                organization=org,
                patient=patient,
                email=mail,
            )
            if disabled:
                store.set_disabled(name)
        yield settings, repo
        repo.engine.dispose()


@pytest.fixture
def world(base, unique: str) -> World:
    """The module database with an empty outbox, nobody online, and a fresh case id."""
    settings, repo = base
    with repo.engine.begin() as conn:
        conn.execute(delete(mail_outbox))
        conn.execute(delete(user_presence))
    forget_touches()
    events = CaseEvents()
    Notifier(settings).subscribe(events)
    return World(settings, repo, events, case_id=f"c{unique[:12]}")


# -- a real SMTP server ---------------------------------------------------------------------------


def worker_for(world: World, port: int, **overrides: object) -> MailWorker:
    settings = world.settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port})
    settings = settings.model_copy(update=overrides)
    return MailWorker(build_engine(settings.database_url), settings)


def drain(worker: MailWorker) -> None:
    while worker.run_once():
        pass


# -- in-app notifications ------------------------------------------------------------------------


def recipients_of(comms: list[dict]) -> set[str]:
    out = set()
    for c in comms:
        for r in c["recipient"]:
            out.add(r.get("reference") or f"user:{r['identifier']['value']}")
    return out


EXPECTED = [
    # kind, actor, in-app recipients (FHIR identity or user:<name>), email usernames
    (K.SUBMITTED, "req", {"user:admin1", "user:admin2"}, {"admin1"}),
    (K.ASSIGNED, "admin1", {"PractitionerRole/prov-role", "PractitionerRole/req-role"}, None),
    (K.ACCEPTED, "prov", {"PractitionerRole/req-role"}, None),
    (
        K.REJECTED,
        "prov",
        {"PractitionerRole/req-role", "user:admin1", "user:admin2"},
        {"req", "admin1"},
    ),
    (K.RETURNED, "prov", {"PractitionerRole/req-role"}, None),
    (K.DONE, "prov", {"PractitionerRole/req-role"}, None),
    (K.ISSUE_OPENED, "admin1", {"PractitionerRole/req-role"}, None),
    (K.APPOINTMENT_PROPOSED, "req", {"PractitionerRole/prov-role"}, None),
    (K.APPOINTMENT_PROPOSED, "prov", {"PractitionerRole/req-role"}, None),
    (K.INVOICE_ISSUED, None, {"PractitionerRole/req-role", "PractitionerRole/req-role-2"}, None),
    (K.CANCELLED, "req", {"PractitionerRole/prov-role"}, None),
    (K.STARTED, "prov", set(), None),
]


@pytest.mark.parametrize(("kind", "actor", "expected", "mailed"), EXPECTED)
def test_each_event_notifies_the_right_users(world, kind, actor, expected, mailed):
    world.emit(kind, actor=actor)
    comms = world.notifications()
    assert recipients_of(comms) == expected
    assert len(comms) == len(expected)  # one notification per identity
    users = {
        "PractitionerRole/req-role": "req",
        "PractitionerRole/req-role-2": "req2",
        "PractitionerRole/prov-role": "prov",
    }
    if mailed is None:  # everyone notified has an address
        mailed = {users.get(r, r.removeprefix("user:")) for r in expected}
    assert {row.username for row in world.outbox_rows()} == mailed
    for c in comms:
        assert c["status"] == "completed"
        assert c["category"][0]["coding"][0]["code"] == "notification"
        assert c["about"] == [
            {"reference": f"ServiceRequest/{world.case_id}", "display": CASE_NUMBER}
        ]
        assert "basedOn" not in c  # basedOn the case would make it chat
        assert "subject" not in c
        assert CASE_NUMBER in c["payload"][0]["contentString"]
        assert c["topic"]["text"] == kind.value
    for r in expected:
        if r.startswith("user:"):
            ident = next(
                x["identifier"]
                for c in comms
                for x in c["recipient"]
                if x.get("identifier", {}).get("value") == r[5:]
            )
            assert ident["system"] == USERNAME_SYSTEM


def test_nothing_clinical_in_notifications_or_emails(world):
    for kind in (K.SUBMITTED, K.ASSIGNED, K.REJECTED, K.RETURNED, K.DONE, K.ISSUE_OPENED):
        world.emit(kind, actor="prov")
    comms = world.notifications()
    rows = world.outbox_rows()
    assert comms and rows
    for c in comms:
        text = c["payload"][0]["contentString"]
        assert CLINICAL not in str(c) and "melanoma" not in str(c)
        assert text.count("CASE-") == 1 and len(text) < 120
    for row in rows:
        assert "melanoma" not in row.subject + row.body
        assert CASE_NUMBER in row.subject and CASE_NUMBER in row.body
        assert f"{PUBLIC_URL}/viewer/cases/{world.case_id}" in row.body


def test_recipients_see_their_notifications_through_the_access_policy(world):
    world.emit(K.ASSIGNED, actor="admin1")
    world.emit(K.SUBMITTED, actor="req")
    mine = world.notifications(principal("prov"))
    assert [c["payload"][0]["contentString"] for c in mine] == [
        f"Case {CASE_NUMBER} was assigned to you."
    ]
    by_recipient = [
        ("category", NOTIFICATION),
        ("recipient", "PractitionerRole/req-role"),
    ]
    found = world.repo.read_only(
        lambda tx: tx.find("Communication", by_recipient), caller=principal("req")
    )
    about = [{"reference": f"ServiceRequest/{world.case_id}", "display": CASE_NUMBER}]
    assert [s.resource["recipient"] for s in found if s.resource["about"] == about] == [
        [{"reference": "PractitionerRole/req-role"}]
    ]
    assert all(
        s.resource["recipient"] == [{"reference": "PractitionerRole/req-role"}] for s in found
    )
    assert world.notifications(principal("prov2")) == []
    assert world.notifications(principal("stranger")) == []
    assert len(world.notifications(principal("admin1"))) == 4  # admins see all but chat


def test_rolled_back_event_leaves_no_notification_and_no_email(world):
    event = CaseEvent(
        kind=K.ASSIGNED,
        case_id=world.case_id,
        case_number=CASE_NUMBER,
        requester="PractitionerRole/req-role",
        provider="PractitionerRole/prov-role",
    )

    def work(tx):  # type: ignore[no-untyped-def]
        world.events.emit(tx, event)
        assert tx.conn.execute(select(mail_outbox.c.id)).all()  # written in this transaction
        raise RuntimeError("the case change failed")

    with pytest.raises(RuntimeError):
        world.repo.write(work)
    assert world.notifications() == []
    assert world.outbox_rows() == []


def test_online_users_get_no_email(world):
    assert touch_presence(world.engine, "prov", wait=True) is True
    assert touch_presence(world.engine, "prov") is False  # throttled: once a minute per process
    world.emit(K.ASSIGNED, actor="admin1")
    assert recipients_of(world.notifications()) == {
        "PractitionerRole/prov-role",
        "PractitionerRole/req-role",
    }
    assert [row.username for row in world.outbox_rows()] == ["req"]


def test_presence_older_than_the_window_counts_as_offline(world):
    old = utc_now() - timedelta(seconds=world.settings.presence_window + 5)
    assert touch_presence(world.engine, "prov", now=old, wait=True)
    world.emit(K.ASSIGNED, actor="admin1")
    assert {row.username for row in world.outbox_rows()} == {"prov", "req"}


def test_self_request_and_organization_fallback(world):
    world.emit(K.DONE, actor="prov", requester="Patient/pat-1", requester_org=None)
    assert recipients_of(world.notifications()) == {"Patient/pat-1"}
    # A requester reference no user acts as: the requesting organization's users are told.
    second = f"{world.case_id}-2"
    world.emit(K.ACCEPTED, actor="prov", requester="Practitioner/nobody", case_id=second)
    comms = [c for c in world.notifications() if c["about"][0]["reference"].endswith(second)]
    assert recipients_of(comms) == {"PractitionerRole/req-role", "PractitionerRole/req-role-2"}


# -- email delivery --------------------------------------------------------------------------------


def test_worker_delivers_to_a_real_smtp_server(world):
    world.emit(K.ASSIGNED, actor="admin1")
    port = free_port()
    with SmtpServer(port) as smtp:
        worker = worker_for(world, port)
        drain(worker)
        worker.engine.dispose()
    got = {tuple(rcpt): (mail_from, msg) for mail_from, rcpt, msg in smtp.messages}
    assert set(got) == {("prov@example.test",), ("req@example.test",)}
    mail_from, msg = got[("prov@example.test",)]
    assert mail_from == "notify@mso.example.test"
    assert msg["To"] == "prov@example.test"
    assert msg["Subject"] == f"[MSO] Case {CASE_NUMBER} assigned to you"
    assert msg["Auto-Submitted"] == "auto-generated"
    body = body_of(msg)
    assert f"Case {CASE_NUMBER} was assigned to you." in body
    assert f"{PUBLIC_URL}/viewer/cases/{world.case_id}" in body
    assert "melanoma" not in msg.as_string()
    assert {row.status for row in world.outbox_rows()} == {"sent"}
    assert all(row.sent is not None and row.attempts == 1 for row in world.outbox_rows())


def test_smtp_down_is_retried_with_backoff_then_delivered(world):
    world.emit(K.ACCEPTED, actor="prov")
    port = free_port()  # nothing listens there yet
    worker = worker_for(world, port)
    for attempt, wait in ((1, 0.3), (2, 0.6)):  # 0.3 s, then doubled
        before = utc_now().replace(tzinfo=None)
        assert worker.run_once() == 1
        after = utc_now().replace(tzinfo=None)
        [row] = world.outbox_rows()
        assert (row.status, row.attempts) == ("pending", attempt)
        assert "Connection" in row.last_error or "refused" in row.last_error.lower()
        due = row.due.replace(tzinfo=None)
        # the wait counts from the attempt, somewhere between before and after (a loaded
        # machine may take a while over a refused connection)
        assert (due - after).total_seconds() <= wait + 0.05
        assert (due - before).total_seconds() >= wait - 0.05
        assert worker.run_once() == 0  # not due yet
        time.sleep(max(0.0, (due - utc_now().replace(tzinfo=None)).total_seconds()) + 0.05)
    with SmtpServer(port) as smtp:
        assert worker.run_once() == 1
    worker.engine.dispose()
    [row] = world.outbox_rows()
    assert (row.status, row.attempts) == ("sent", 3)
    assert [rcpt for _, rcpt, _ in smtp.messages] == [["req@example.test"]]


def test_gives_up_after_max_attempts(world):
    world.emit(K.ACCEPTED, actor="prov")
    worker = worker_for(world, free_port(), smtp_retry_base=0.0, smtp_max_attempts=3)
    for _ in range(3):
        assert worker.run_once() == 1
    assert worker.run_once() == 0
    worker.engine.dispose()
    [row] = world.outbox_rows()
    assert (row.status, row.attempts) == ("failed", 3)


def test_recipient_refused_permanently_fails_at_once(world):
    class Refusing(Collector):
        async def handle_RCPT(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
            if address.startswith("req@"):
                return "550 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    world.emit(K.ASSIGNED, actor="admin1")
    port = free_port()
    handler = Refusing()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        worker = worker_for(world, port)
        drain(worker)
        worker.engine.dispose()
    finally:
        controller.stop()
    status = {row.username: (row.status, row.attempts) for row in world.outbox_rows()}
    assert status == {"req": ("failed", 1), "prov": ("sent", 1)}
    assert [rcpt for _, rcpt, _ in handler.messages] == [["prov@example.test"]]


def test_two_workers_send_each_email_exactly_once(world):
    for n in range(30):
        world.emit(K.ASSIGNED, actor="admin1", case_id=f"{world.case_id}-{n}")
    assert len(world.outbox_rows()) == 60
    port = free_port()
    with SmtpServer(port, delay=0.005) as smtp:
        workers = [worker_for(world, port, mail_poll_interval=0.02) for _ in range(2)]
        for i, w in enumerate(workers):
            w.batch_size = 3
            w.name = f"mail-worker-{i}"
            assert w.start()
        deadline = time.monotonic() + 60
        while len(smtp.messages) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # would a duplicate still arrive?
        for w in workers:
            w.stop()
            w.engine.dispose()
    ids = [msg["Message-ID"] for _, _, msg in smtp.messages]
    assert len(ids) == 60 and len(set(ids)) == 60
    assert {row.status for row in world.outbox_rows()} == {"sent"}
    assert {row.message_id for row in world.outbox_rows()} == set(ids)


def test_expired_claim_is_taken_over(world):
    world.emit(K.ACCEPTED, actor="prov")
    [claimed] = outbox.claim(world.engine, limit=5, lease=300)
    assert outbox.claim(world.engine, limit=5, lease=300) == []  # claimed: nobody else gets it
    with world.engine.begin() as conn:  # the claiming worker died and the lease ran out
        conn.execute(update(mail_outbox).values(due=utc_now() - timedelta(seconds=1)))
    [again] = outbox.claim(world.engine, limit=5, lease=300)
    assert again.id == claimed.id and again.attempts == 2
    assert outbox.mark_sent(world.engine, claimed) is False  # the stale claim is fenced off
    assert outbox.mark_sent(world.engine, again) is True


def test_old_sent_emails_are_purged_failed_ones_kept(world):
    world.emit(K.REJECTED, actor="prov")  # to req and admin1
    first, second = outbox.claim(world.engine, limit=5, lease=300)
    long_ago = utc_now() - timedelta(days=40)
    assert outbox.mark_sent(world.engine, first, now=long_ago)
    outbox.mark_failed(
        world.engine, second, "550", permanent=True, max_attempts=5, retry_base=1, retry_max=1
    )
    assert outbox.purge_sent(world.engine, older_than=30 * 86400) == 1
    assert [row.status for row in world.outbox_rows()] == ["failed"]


def test_stop_releases_unsent_claims(world):
    world.emit(K.ACCEPTED, actor="prov")
    [claimed] = outbox.claim(world.engine, limit=5, lease=300)
    outbox.release(world.engine, [claimed])
    [row] = world.outbox_rows()
    assert (row.status, row.attempts) == ("pending", 0)


def test_without_smtp_host_emails_stay_queued_with_one_warning(world, caplog):
    world.emit(K.ACCEPTED, actor="prov")
    worker = MailWorker(world.engine, world.settings)
    with caplog.at_level("WARNING", logger="fhir_server.messaging.worker"):
        assert worker.start() is False
    assert worker.run_once() == 0
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "MSO_SMTP_HOST" in caplog.text
    assert [row.status for row in world.outbox_rows()] == ["pending"]


# -- wiring ----------------------------------------------------------------------------------------


def test_app_subscribes_to_the_shared_bus_and_runs_the_worker(world):
    from fastapi.testclient import TestClient

    port = free_port()
    settings = world.settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port})
    app = create_app(settings)
    events = app.state.services.events
    assert isinstance(events, CaseEvents)
    event = CaseEvent(K.ACCEPTED, world.case_id, CASE_NUMBER, requester="PractitionerRole/req-role")
    with SmtpServer(port) as smtp, TestClient(app):
        app.state.repo.write(lambda tx: events.emit(tx, event))
        deadline = time.monotonic() + 10
        while not smtp.messages and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [rcpt for _, rcpt, _ in smtp.messages] == [["req@example.test"]]
    assert not app.state.messaging.worker.running  # stopped with the application


# -- users ----------------------------------------------------------------------------------------


def test_user_email_is_stored_and_checked(base, unique, monkeypatch, capsys):
    db_url = base[0].database_url
    name = f"mailer-{unique[:8]}"
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    argv = ["--database-url", db_url, "user", "create", "--username", name, "--password-stdin"]
    code = main([*argv, "--role", "admin", "--email", "mailer@example.test"])
    assert code == 0, capsys.readouterr()
    store = UserStore(base[1].engine)
    assert store.get(name).email == "mailer@example.test"
    store.set_disabled(name)  # keep the module's admin set as USERS says
    for bad in ("no-at-sign", "a@b", "x@example.test\r\nBcc: evil@example.test", "A <a@b.c>"):
        with pytest.raises(UserError):
            store.create(username=f"{name}-bad", password=PASSWORD, role="admin", email=bad)
