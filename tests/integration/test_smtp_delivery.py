"""Email delivery against real SMTP servers (aiosmtpd) with the default settings: a plain local
server works (STARTTLS ``auto``), a refusing one is retried with backoff and shows up in
``mso outbox status`` with its SMTP code only, never the addresses or the message."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import tempfile

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from fhir_server.cli import main
from fhir_server.config import Settings
from fhir_server.messaging import outbox
from fhir_server.messaging.worker import MailWorker
from fhir_server.storage.engine import build_engine
from fhir_server.storage.messaging_schema import mail_outbox
from tests.smtp_server import Collector, SmtpServer, body_of, free_port

ADDRESS = "dr.smith@hospital.example.test"


@pytest.fixture
def engine(fresh_db_url):
    engine = build_engine(fresh_db_url, pool_size=2)
    yield engine
    engine.dispose()


def enqueue(engine, n: int = 1) -> None:
    mails = [
        outbox.OutgoingMail(
            to_addr=ADDRESS, subject="[MSO] Case assigned", body="Sign in.", event="assigned"
        )
        for _ in range(n)
    ]
    with engine.begin() as conn:
        outbox.enqueue(conn, mails)


def worker(engine, port: int, **overrides: object) -> MailWorker:
    """A worker with the default SMTP settings apart from host, port and quick retries."""
    values: dict = {"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_timeout": 5.0}
    values |= {"smtp_retry_base": 0.2, "smtp_retry_max": 1.0, **overrides}
    return MailWorker(engine, Settings(database_url=str(engine.url), **values))


def rows(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(select(mail_outbox).order_by(mail_outbox.c.id)).all()


def test_default_settings_deliver_to_a_plain_smtp_server(engine) -> None:
    assert Settings().smtp_starttls == "auto"
    enqueue(engine)
    port = free_port()
    with SmtpServer(port) as smtp:
        assert worker(engine, port).run_once() == 1
    [(_, rcpt, message)] = smtp.messages
    assert rcpt == [ADDRESS] and body_of(message).strip() == "Sign in."
    [row] = rows(engine)
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)


def test_starttls_true_requires_it(engine) -> None:
    enqueue(engine)
    port = free_port()
    with SmtpServer(port) as smtp:
        worker(engine, port, smtp_starttls="true").run_once()
    assert smtp.messages == []
    [row] = rows(engine)
    assert row.status == "pending" and row.last_error.startswith("SMTPNotSupportedError")


def _self_signed_context() -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile() as c, tempfile.NamedTemporaryFile() as k:
        c.write(cert.public_bytes(serialization.Encoding.PEM))
        k.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        c.flush()
        k.flush()
        context.load_cert_chain(c.name, k.name)
    return context


def test_auto_upgrades_when_the_server_offers_starttls(engine) -> None:
    """The server offers STARTTLS with an untrusted certificate: ``auto`` upgrades, so the
    certificate check fails (nothing goes out in the clear); ``false`` sends in plain text."""
    enqueue(engine)
    port = free_port()
    handler = Collector()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, tls_context=_self_signed_context()
    )
    controller.start()
    try:
        worker(engine, port).run_once()
        [row] = rows(engine)
        assert row.status == "pending"
        assert row.last_error == "SSLCertVerificationError CERTIFICATE_VERIFY_FAILED"
        assert handler.messages == []
        with engine.begin() as conn:  # due now
            conn.execute(mail_outbox.update().values(due=outbox.utc_now()))
        worker(engine, port, smtp_starttls="false").run_once()
        assert [rcpt for _, rcpt, _ in handler.messages] == [[ADDRESS]]
    finally:
        controller.stop()


class Busy(Collector):
    """Refuses every recipient for now (4xx, retry later), naming the address in its reply."""

    async def handle_RCPT(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        return f"451 4.3.0 mailbox of {address} busy, try later"


def test_refused_delivery_is_retried_counted_and_reported(engine, capsys, caplog) -> None:
    enqueue(engine, 2)
    port = free_port()
    handler = Busy()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    mailer = worker(engine, port, smtp_max_attempts=2, smtp_retry_base=0.0)
    try:
        with caplog.at_level(logging.INFO, logger="fhir_server"):
            assert mailer.run_once() == 2
            assert {(r.status, r.attempts) for r in rows(engine)} == {("pending", 1)}
            assert mailer.run_once() == 2  # backoff 0 s: due again at once
    finally:
        controller.stop()
    assert {(r.status, r.attempts) for r in rows(engine)} == {("failed", 2)}
    assert {r.last_error for r in rows(engine)} == {"SMTPRecipientsRefused 451"}
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("fhir_server")]
    assert ours and not [line for line in ours if ADDRESS in line or "busy" in line]

    enqueue(engine)  # one more, not yet attempted
    assert main(["outbox", "status", "--database-url", str(engine.url)]) == 0
    out = capsys.readouterr().out
    assert "pending 1, sending 0, sent 0, failed 2" in out
    assert "oldest undelivered: 20" in out
    assert out.count("SMTPRecipientsRefused 451") == 2
    assert ADDRESS not in out and "[MSO]" not in out


def test_backoff_doubles_between_attempts(engine) -> None:
    enqueue(engine)
    mailer = worker(engine, free_port(), smtp_retry_base=10.0, smtp_retry_max=15.0)
    waits = []
    for _ in range(3):
        before = outbox.utc_now()
        assert mailer.run_once() == 1  # nobody listens: connection refused
        [row] = rows(engine)
        waits.append(round((outbox.as_utc(row.due) - before).total_seconds()))
        with engine.begin() as conn:
            conn.execute(mail_outbox.update().values(due=before))
    assert waits == [10, 15, 15]  # 10, 20 capped at 15
    [row] = rows(engine)
    assert row.attempts == 3 and row.last_error.startswith("ConnectionRefusedError")
