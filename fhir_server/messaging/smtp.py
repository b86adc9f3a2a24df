"""Delivery over SMTP (RFC 5321) with :mod:`smtplib`: one connection per batch of emails.

:class:`SmtpConfig` comes from the ``MSO_SMTP_*`` settings. STARTTLS (RFC 3207) verifies the
server's certificate with the system's trust store. ``MSO_SMTP_STARTTLS=auto`` (the default)
upgrades when the server's EHLO reply offers STARTTLS and talks plain SMTP otherwise, so a local
relay without TLS works out of the box; ``true`` requires it (delivery fails without), ``false``
never upgrades. Errors are sorted into permanent ones (the
server refused this message or recipient with a 5xx reply: retrying cannot help) and transient
ones (connection trouble, 4xx replies, authentication or configuration problems that an
operator can fix): see :func:`is_permanent`. :func:`describe` reduces an error to what may be
logged and stored: its class, SMTP reply code or errno, never the server's reply text (which
can echo addresses) nor anything of the message.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from types import TracebackType
from typing import Literal

from fhir_server.config import Settings

StartTls = Literal["auto", "true", "false"]


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how to send."""

    host: str
    port: int = 587
    user: str | None = None
    password: str | None = None
    starttls: StartTls = "auto"
    sender: str = "MSO <no-reply@localhost>"
    timeout: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpConfig | None:
        """The configuration of ``settings``; ``None`` when no SMTP host is set."""
        if not settings.smtp_host:
            return None
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            user=settings.smtp_user,
            password=password,
            starttls=settings.smtp_starttls,
            sender=settings.smtp_from,
            timeout=settings.smtp_timeout,
        )

    @property
    def sender_domain(self) -> str:
        """The domain of the From address (for Message-IDs)."""
        return parseaddr(self.sender)[1].rpartition("@")[2] or "mso.invalid"


def build_message(
    config: SmtpConfig, *, to_addr: str, subject: str, body: str, message_id: str
) -> EmailMessage:
    """A plain-text message marked as automatically generated (RFC 3834)."""
    message = EmailMessage()
    message["From"] = config.sender
    message["To"] = to_addr
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(body)
    return message


class SmtpSession:
    """One SMTP connection (context manager): connect, STARTTLS, AUTH, then :meth:`send`."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._smtp: smtplib.SMTP | None = None

    def __enter__(self) -> SmtpSession:
        config = self.config
        smtp = smtplib.SMTP(config.host, config.port, timeout=config.timeout)
        try:
            smtp.ehlo()
            if config.starttls == "true" or (
                config.starttls == "auto" and smtp.has_extn("starttls")
            ):
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if config.user:
                smtp.login(config.user, config.password or "")
        except BaseException:
            smtp.close()
            raise
        self._smtp = smtp
        return self

    def send(self, message: EmailMessage) -> None:
        """Hand ``message`` to the server; returns once it accepted it for every recipient."""
        assert self._smtp is not None, "use SmtpSession as a context manager"
        refused = self._smtp.send_message(message)
        if refused:  # some recipients refused: there is only one, so this is unreachable
            raise smtplib.SMTPRecipientsRefused(refused)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()


def is_permanent(exc: BaseException) -> bool:
    """True when the server refused the message itself (5xx on recipient, sender or data)."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(code >= 500 for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPDataError):
        return exc.smtp_code >= 500
    return False


def describe(exc: BaseException) -> str:
    """A short, log-safe description of a delivery error: its class and SMTP reply code(s),
    errno or TLS reason, e.g. ``SMTPRecipientsRefused 550``, ``ConnectionRefusedError errno 111``.
    Never the reply text or the exception's message: they can carry addresses."""
    parts = [type(exc).__name__]
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        parts += sorted({str(code) for code, _ in exc.recipients.values()})
    elif isinstance(exc, smtplib.SMTPResponseException):
        parts.append(str(exc.smtp_code))
    elif isinstance(exc, ssl.SSLError) and exc.reason:
        parts.append(str(exc.reason))
    elif isinstance(exc, smtplib.SMTPNotSupportedError):
        parts.append("(server does not offer a required extension: STARTTLS or AUTH)")
    elif isinstance(exc, OSError) and exc.errno is not None:
        parts.append(f"errno {exc.errno}")
    return " ".join(parts)
