"""A real SMTP server for tests (aiosmtpd on a loopback port) that keeps what it accepts."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Collector:
    """aiosmtpd handler keeping every accepted message as (mail from, recipients, message)."""

    delay: float = 0.0
    messages: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.delay:
            await asyncio.sleep(self.delay)
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 OK"


class SmtpServer:
    """``with SmtpServer(port) as collector:`` runs an SMTP server on ``port``."""

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.port = port
        self.handler = Collector(delay)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=port)

    def __enter__(self) -> Collector:
        self.controller.start()
        return self.handler

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def body_of(message) -> str:  # type: ignore[no-untyped-def]
    """The plain-text body of a parsed email."""
    return message.get_body(preferencelist=("plain",)).get_content()
