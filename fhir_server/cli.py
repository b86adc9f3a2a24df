"""The ``mso`` command: ``serve``, ``migrate``, ``load-conformance``, ``reindex``, ``seed-demo``,
and the authorization commands ``user``, ``client``, ``launch``, ``key``, ``token``
(:mod:`fhir_server.auth.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from fhir_server.config import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from fhir_server.storage.migrate import upgrade

    upgrade(settings.database_url)
    _load_conformance(settings)  # once here, before the workers start
    # Workers re-read settings from the environment: pass the command-line choices down.
    os.environ["MSO_DATABASE_URL"] = settings.database_url
    from fhir_server.serve import serve

    return serve(
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.workers,
        log_level=args.log_level,
        access_log=args.access_log,
    )


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mso``."""
    parser = argparse.ArgumentParser(prog="mso", description="MSO FHIR server")
    parser.add_argument("--database-url", help="overrides MSO_DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="migrate the database and serve the FHIR API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False)
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser(
        "migrate", help="apply database migrations (at head: and load the conformance resources)"
    )
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(func=_migrate)

    conformance = sub.add_parser(
        "load-conformance",
        help="store the MSO profiles, questionnaires and terminology (idempotent)",
    )
    conformance.set_defaults(func=_load_conformance_command)

    seed = sub.add_parser("seed-demo", help="load demo data (idempotent)")
    seed.set_defaults(func=_seed_demo)

    reindex = sub.add_parser("reindex", help="rebuild search indexes")
    reindex.add_argument("--type", help="only this resource type")
    reindex.set_defaults(func=_reindex)

    from fhir_server.auth.cli import add_auth_commands

    add_auth_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mso`` console script."""
    args = build_parser().parse_args(argv)
    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = Settings(**overrides)
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
