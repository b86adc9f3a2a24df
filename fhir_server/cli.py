"""The ``mso`` command: ``serve``, ``worker``, ``migrate``, ``load-conformance``, ``reindex``,
``seed-demo``, ``outbox status``, and the authorization commands ``user``, ``client``,
``launch``, ``key``, ``token`` (:mod:`fhir_server.auth.cli`), and ``dicom-gateway``, which hands
its arguments to :func:`dicom_gateway.__main__.main` and never touches the database.

Every command says on stderr which database it uses (password hidden; a SQLite file with its
absolute path), because a relative SQLite URL means a different file in every folder. Only the
commands that set a database up (``serve``, ``migrate``, ``load-conformance``, ``seed-demo``,
``user create``, ``client create``, ``key rotate``: parsers with ``creates_database``) may
create one; the others refuse a missing one with exit status 2 instead of creating and
migrating an empty file and then finding nothing in it. ``--database-url`` is accepted before
and after the sub-command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from fhir_server.config import Settings

if TYPE_CHECKING:
    from fhir_server.messaging.outbox import OutboxStatus

DATABASE_HELP = "database URL (overrides MSO_DATABASE_URL); before or after the sub-command"


class DatabaseUnavailable(Exception):
    """A command that only uses an existing database found none; the message says what to do."""


def database_label(url: str) -> str:
    """``url`` for display: password hidden, a SQLite file followed by its absolute path."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    label = parsed.render_as_string(hide_password=True)
    path = _sqlite_file(url)
    return f"{label} ({path})" if path is not None else label


def _sqlite_file(url: str) -> Path | None:
    """The absolute path of a SQLite database file, ``None`` for other databases."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()


def require_database(url: str) -> None:
    """Raise :class:`DatabaseUnavailable` unless ``url`` names an existing MSO database; never
    creates anything (SQLite: checks the file before connecting, as connecting creates it)."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    hint = (
        "create it with `mso migrate` (empty) or `mso seed-demo` (demo data), or give "
        "--database-url / MSO_DATABASE_URL of an existing one"
    )
    path = _sqlite_file(url)
    if path is not None and not path.is_file():
        raise DatabaseUnavailable(f"no database at {path}: {hint}")
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                raise DatabaseUnavailable(f"the database holds no MSO schema: {hint}")
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseUnavailable(f"cannot open the database ({reason})") from None
    finally:
        engine.dispose()


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from fhir_server.storage.migrate import upgrade

    upgrade(settings.database_url)
    _load_conformance(settings)  # once here, before the workers start
    access_log = settings.access_log if args.access_log is None else args.access_log
    # Workers re-read settings from the environment: pass the command-line choices down.
    os.environ["MSO_DATABASE_URL"] = settings.database_url
    from fhir_server.serve import serve

    return serve(
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.workers,
        log_level=args.log_level,
        access_log=access_log,
    )


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from fhir_server.bulk.worker import run
    from fhir_server.messaging.subscription_worker import SubscriptionWorker
    from fhir_server.storage.wakeups import Wakeups
    from fhir_server.wiring import build_repository

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    repo = build_repository(settings)
    wakeups = Wakeups(repo.engine)  # woken by other processes' commits (PostgreSQL)
    notifications = SubscriptionWorker(repo, settings, wakeups)
    wakeups.start()
    try:
        if args.once:
            while notifications.run_once():
                pass
        else:
            notifications.start()  # Subscription notifications beside the export jobs
        return run(settings, once=args.once)
    finally:
        notifications.stop()
        wakeups.stop()
        repo.dispose()


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from fhir_server.storage.migrate import upgrade

    upgrade(settings.database_url, args.revision)
    print(f"Database at {settings.database_url} is at revision {args.revision}")
    if args.revision == "head":
        _load_conformance(settings)
    return 0


def _load_conformance(settings: Settings, out: TextIO = sys.stderr) -> None:
    from fhir_server.conformance import load_conformance

    print(load_conformance(settings).summary().capitalize(), file=out)


def _load_conformance_command(args: argparse.Namespace, settings: Settings) -> int:
    from fhir_server.storage.migrate import upgrade

    upgrade(settings.database_url)
    _load_conformance(settings, sys.stdout)
    return 0


def _reindex(args: argparse.Namespace, settings: Settings) -> int:
    from fhir_server.cli_reindex import reindex

    count = reindex(settings, args.type)
    print(f"Reindexed {count} resources")
    return 0


def _seed_demo(args: argparse.Namespace, settings: Settings) -> int:
    from fhir_server.auth.cli import default_audience
    from fhir_server.demo import credentials_text, seed_demo
    from fhir_server.storage.migrate import upgrade

    upgrade(settings.database_url)
    result = seed_demo(settings)
    users = sum(1 for _, created in result.users if created)
    print(
        f"Demo data loaded: {result.resources} resources, {users} users, "
        f"{int(result.client_created)} client, {result.cases_submitted} cases submitted, "
        f"{result.moves} case operations run"
    )
    print(credentials_text(result, default_audience(settings)))
    return 0


def _outbox_status(args: argparse.Namespace, settings: Settings) -> int:
    from fhir_server.messaging import outbox
    from fhir_server.storage.engine import build_engine

    engine = build_engine(settings.database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            report = outbox.status(conn, problems=args.errors)
    finally:
        engine.dispose()
    print(format_outbox_status(report, smtp_host=settings.smtp_host))
    return 0


def _dicom_gateway(args: argparse.Namespace, settings: Settings | None = None) -> int:
    from dicom_gateway.__main__ import main as gateway_main

    return gateway_main(args.gateway_args)


def format_outbox_status(report: OutboxStatus, *, smtp_host: str | None) -> str:
    """The text of ``mso outbox status``: counts, oldest undelivered email, last errors."""
    c = report.counts
    lines = [
        f"pending {c.get('pending', 0)}, sending {c.get('sending', 0)}, "
        f"sent {c.get('sent', 0)}, failed {c.get('failed', 0)}",
        "oldest undelivered: "
        + (report.oldest_pending.isoformat(timespec="seconds") if report.oldest_pending else "-"),
        f"SMTP server: {smtp_host or 'none (MSO_SMTP_HOST unset: emails stay queued)'}",
    ]
    if report.problems:
        lines += ["", "last errors (newest first):"]
        rows = [("ID", "EVENT", "STATUS", "ATTEMPTS", "NEXT TRY / GAVE UP", "ERROR")]
        rows += [
            (
                str(p.id),
                p.event,
                p.status,
                str(p.attempts),
                p.due.isoformat(timespec="seconds"),
                p.last_error,
            )
            for p in report.problems
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += [
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mso``."""
    parser = argparse.ArgumentParser(prog="mso", description="MSO FHIR server")
    parser.add_argument("--database-url", metavar="URL", help=DATABASE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="migrate the database and serve the FHIR API")
    serve.add_argument("--host", help="address to bind (default: MSO_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: MSO_PORT, 8080)")
    serve.add_argument(
        "--workers", type=int, help="worker processes, one per core (default: MSO_WORKERS, 1)"
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="server log level (default: info)",
    )
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one line per request on stdout: client, method, path without the query string, "
        "status, duration (default: MSO_ACCESS_LOG, on)",
    )
    serve.set_defaults(func=_serve, creates_database=True)

    migrate = sub.add_parser(
        "migrate", help="apply database migrations (at head: and load the conformance resources)"
    )
    migrate.add_argument(
        "--revision",
        default="head",
        help="Alembic revision to upgrade to (default: head, the latest)",
    )
    migrate.set_defaults(func=_migrate, creates_database=True)

    conformance = sub.add_parser(
        "load-conformance",
        help="store the MSO profiles, questionnaires and terminology (idempotent)",
    )
    conformance.set_defaults(func=_load_conformance_command, creates_database=True)

    seed = sub.add_parser("seed-demo", help="load demo data (idempotent)")
    seed.set_defaults(func=_seed_demo, creates_database=True)

    reindex = sub.add_parser("reindex", help="rebuild search indexes")
    reindex.add_argument(
        "--type", metavar="RESOURCE_TYPE", help="only this resource type (default: all)"
    )
    reindex.set_defaults(func=_reindex)

    worker = sub.add_parser(
        "worker",
        help="run bulk export jobs and deliver Subscription notifications (any number, on any "
        "host)",
    )
    from fhir_server.bulk.worker import add_arguments as add_worker_arguments

    add_worker_arguments(worker)
    worker.set_defaults(func=_worker)

    outbox = sub.add_parser("outbox", help="the notification email outbox").add_subparsers(
        dest="outbox_command", required=True
    )
    status = outbox.add_parser(
        "status",
        help="emails pending, sent and failed, the oldest undelivered one and the last errors",
    )
    status.add_argument(
        "--errors",
        type=int,
        default=10,
        metavar="N",
        help="how many of the latest failed attempts to list (default: 10)",
    )
    status.set_defaults(func=_outbox_status)

    gateway = sub.add_parser(
        "dicom-gateway",
        help="run the DICOM gateway: C-STORE SCP, durable spool, forwarding to Orthanc "
        "(`mso dicom-gateway --help` lists its options)",
        add_help=False,
    )
    gateway.add_argument(
        "gateway_args", nargs=argparse.REMAINDER, help="the options of python -m dicom_gateway"
    )
    gateway.set_defaults(func=_dicom_gateway, creates_database=True)

    from fhir_server.auth.cli import add_auth_commands

    add_auth_commands(sub)
    _accept_database_url_everywhere(parser)
    return parser


def _accept_database_url_everywhere(parser: argparse.ArgumentParser) -> None:
    """Add ``--database-url`` to every sub-command parser (and its one-line help as the
    description where it has none). ``SUPPRESS`` as the default keeps
    a value given before the sub-command when none is given after it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                if child.description is None:  # `mso X --help` repeats the help of `mso --help`
                    child.description = helps.get(name)
                child.add_argument(
                    "--database-url", metavar="URL", default=argparse.SUPPRESS, help=DATABASE_HELP
                )
                _accept_database_url_everywhere(child)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mso`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dicom-gateway"]:  # its own settings, no FHIR database
        return _dicom_gateway(argparse.Namespace(gateway_args=argv[1:]))
    args = build_parser().parse_args(argv)
    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = Settings(**overrides)
    print(f"mso: database {database_label(settings.database_url)}", file=sys.stderr)
    if not getattr(args, "creates_database", False):
        try:
            require_database(settings.database_url)
        except DatabaseUnavailable as exc:
            print(f"mso: error: {exc}", file=sys.stderr)
            return 2
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
