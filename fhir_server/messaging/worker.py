"""The outbox worker: a background thread that delivers queued emails over SMTP.

Every server process runs one (started and stopped by the application's lifespan), rather than
a separate ``mso mail-worker`` process: the embedded ``mso serve`` then needs nothing else to
send mail, and several processes are safe because rows are claimed (:func:`.outbox.claim`), so
each email is delivered by exactly one of them. ``Settings.mail_worker = False`` turns it off in
processes that should not send.

Each round claims a small batch, opens one SMTP connection, sends and settles the emails one by
one, and releases what it did not attempt when asked to stop. When a round finds nothing, the
thread sleeps ``mail_poll_interval`` seconds (or until :meth:`MailWorker.wake`). Without an
SMTP host it does not start: emails stay queued and a warning is logged once. About once an
hour it deletes sent emails older than ``mail_retention_days`` (failed ones stay).

Every failed attempt is logged (error class and SMTP code: :func:`.smtp.describe`, never the
addresses) and kept in the row (``attempts``, ``last_error``), which ``mso outbox status``
reports.
"""

from __future__ import annotations

import logging
import smtplib
import threading
import time

from sqlalchemy import Engine

from fhir_server.config import Settings
from fhir_server.messaging import outbox
from fhir_server.messaging.smtp import (
    SmtpConfig,
    SmtpSession,
    build_message,
    describe,
    is_permanent,
)

log = logging.getLogger(__name__)

# Errors that concern one message; the connection stays usable for the next one.
_MESSAGE_ERRORS = (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError)
PURGE_INTERVAL = 3600.0


class MailWorker:
    """Delivers the outbox of ``engine``'s database with the SMTP settings of ``settings``."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        batch_size: int = 10,
        name: str = "mail-worker",
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.config = SmtpConfig.from_settings(settings)
        self.batch_size = batch_size
        self.name = name
        # A claim must outlive the slowest batch (a few SMTP commands per email, each bounded
        # by the timeout) or another worker could take over rows still being sent.
        self.lease = max(300.0, settings.smtp_timeout * (4 + 3 * batch_size))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> bool:
        """Start the thread; False (with a warning) when no SMTP host is configured."""
        if self.config is None:
            log.warning(
                "MSO_SMTP_HOST is not set: notification emails are not sent, they stay queued "
                "in mail_outbox until a process with SMTP settings runs"
            )
            return False
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return True

    def wake(self) -> None:
        """Look at the outbox now rather than after the poll interval."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the email being sent, give back the rest of the batch, stop the thread."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout if timeout is not None else self.settings.smtp_timeout * 3)

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        next_purge = time.monotonic()
        while not self._stop.is_set():
            try:
                busy = self.run_once() > 0
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + PURGE_INTERVAL
                    retention = self.settings.mail_retention_days * 86400.0
                    outbox.purge_sent(self.engine, older_than=retention)
            except Exception:
                log.exception("Mail outbox round failed")
                busy = False
            if not busy:
                self._wake.wait(self.settings.mail_poll_interval)
                self._wake.clear()

    # -- one round ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim one batch and attempt each email in it; how many were claimed."""
        if self.config is None:
            return 0
        mails = outbox.claim(self.engine, limit=self.batch_size, lease=self.lease)
        if mails:
            self._deliver(self.config, mails)
        return len(mails)

    def _deliver(self, config: SmtpConfig, mails: list[outbox.ClaimedMail]) -> None:
        remaining = list(mails)
        try:
            with SmtpSession(config) as session:
                while remaining and not self._stop.is_set():
                    mail = remaining[0]
                    message = build_message(
                        config,
                        to_addr=mail.to_addr,
                        subject=mail.subject,
                        body=mail.body,
                        message_id=mail.message_id,
                    )
                    try:
                        session.send(message)
                    except _MESSAGE_ERRORS as exc:
                        remaining.pop(0)
                        log.warning(
                            "Mail %s refused on attempt %d: %s",
                            mail.message_id,
                            mail.attempts,
                            describe(exc),
                        )
                        self._failed(mail, exc)
                        continue
                    remaining.pop(0)
                    if not outbox.mark_sent(self.engine, mail):
                        log.warning("Mail %s was sent after its claim expired", mail.message_id)
        except Exception as exc:  # no connection, or it broke: every unsent email failed
            log.warning("SMTP delivery to %s failed: %s", config.host, describe(exc))
            failed, remaining = remaining, []
            for mail in failed:
                self._failed(mail, exc)
        finally:
            if remaining:
                outbox.release(self.engine, remaining)

    def _failed(self, mail: outbox.ClaimedMail, exc: BaseException) -> None:
        settings = self.settings
        status = outbox.mark_failed(
            self.engine,
            mail,
            describe(exc),
            permanent=is_permanent(exc),
            max_attempts=settings.smtp_max_attempts,
            retry_base=settings.smtp_retry_base,
            retry_max=settings.smtp_retry_max,
        )
        if status is outbox.MailStatus.FAILED:
            log.error(
                "Gave up on mail %s after %d attempts: %s",
                mail.message_id,
                mail.attempts,
                describe(exc),
            )
