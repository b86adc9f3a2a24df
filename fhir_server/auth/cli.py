"""``mso user …``, ``mso client …``, ``mso launch create`` and ``mso key rotate``.

Secrets never go on the command line: passwords and client secrets are read from standard input
(``--password-stdin``, ``--secret-stdin``) or prompted for; a generated client secret and a TOTP
provisioning URI are printed once.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path

import orjson

from fhir_server.auth.server import AuthServer, build_auth_server
from fhir_server.config import Settings

Command = Callable[[argparse.Namespace, AuthServer], int]


class CommandError(Exception):
    """A command that cannot run as asked; the message is shown to the user."""


def _server(settings: Settings) -> AuthServer:
    from fhir_server.storage.engine import build_engine
    from fhir_server.storage.migrate import upgrade

    upgrade(settings.database_url)
    return build_auth_server(build_engine(settings.database_url, pool_size=2), settings)


def _run(command: Command) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from fhir_server.auth.clients import ClientError
        from fhir_server.auth.scopes import ScopeError
        from fhir_server.auth.users import UserError

        server = _server(settings)
        try:
            return command(args, server)
        except (CommandError, UserError, ClientError, ScopeError) as exc:
            print(f"mso: error: {exc}", file=sys.stderr)
            return 2
        finally:
            server.keys.engine.dispose()

    return run


def _read_secret(from_stdin: bool, prompt: str) -> str:
    if from_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    else:
        secret = getpass.getpass(f"{prompt}: ")
        if getpass.getpass(f"{prompt} (again): ") != secret:
            raise CommandError("the two entries differ")
    if not secret:
        raise CommandError("empty secret")
    return secret


# -- users ---------------------------------------------------------------------------------------


def _user_create(args: argparse.Namespace, server: AuthServer) -> int:
    password = _read_secret(args.password_stdin, "Password")
    user, totp_uri = server.users.create(
        username=args.username,
        password=password,
        role=args.role,
        fhir_user=args.fhir_user,
        practitioner_role=args.practitioner_role,
        organization=args.organization,
        patient=args.patient,
        totp=args.totp,
    )
    print(f"Created user {user.username} ({user.role.value})")
    if totp_uri:
        print(f"TOTP provisioning URI (add it to an authenticator app): {totp_uri}")
    return 0


def _user_list(_args: argparse.Namespace, server: AuthServer) -> int:
    rows = [("USERNAME", "ROLE", "FHIR USER", "ORGANIZATION", "PRACTITIONERROLE", "PATIENT", "")]
    for u in server.users.all():
        flags = " ".join(f for f, on in (("totp", u.has_totp), ("disabled", u.disabled)) if on)
        rows.append(
            (
                u.username,
                u.role.value,
                u.fhir_user or "-",
                u.organization or "-",
                u.practitioner_role or "-",
                u.patient or "-",
                flags,
            )
        )
    _print_table(rows)
    return 0


def _user_disable(args: argparse.Namespace, server: AuthServer) -> int:
    enable = args.user_command == "enable"
    if not server.users.set_disabled(args.username, not enable):
        raise CommandError(f"no user '{args.username}'")
    print(f"{'Enabled' if enable else 'Disabled'} user {args.username}")
    return 0


# -- clients -------------------------------------------------------------------------------------


def _client_create(args: argparse.Namespace, server: AuthServer) -> int:
    if args.jwks_url and args.jwks_file:
        raise CommandError("give --jwks-url or --jwks-file, not both")
    jwks = None
    if args.jwks_file:
        try:
            jwks = orjson.loads(Path(args.jwks_file).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise CommandError(f"cannot read the JWKS file: {exc}") from None
        if not isinstance(jwks, dict):
            raise CommandError("the JWKS file must hold a JSON object with a 'keys' array")
    if args.public:
        kind = "public"
    elif not args.redirect_uri:
        kind = "backend"
    else:
        kind = "confidential"
    secret = _read_secret(True, "Client secret") if args.secret_stdin else None
    client, generated = server.clients.create(
        client_id=args.id,
        kind=kind,
        redirect_uris=args.redirect_uri or [],
        scope=args.scope,
        secret=secret,
        jwks_url=args.jwks_url,
        jwks=jwks,
        organization=args.organization,
    )
    print(f"Created {client.kind} client {client.client_id} (scopes: {client.scope})")
    if generated:
        print(f"Client secret (shown once, store it now): {generated}")
    return 0


def _client_list(_args: argparse.Namespace, server: AuthServer) -> int:
    rows = [("CLIENT ID", "KIND", "AUTH", "ORGANIZATION", "REDIRECT URIS", "")]
    for c in server.clients.all():
        methods = [m for m, on in (("secret", c.has_secret), ("keys", c.has_keys)) if on]
        rows.append(
            (
                c.client_id,
                c.kind,
                "+".join(methods) or "none",
                c.organization or "-",
                " ".join(c.redirect_uris) or "-",
                "disabled" if c.disabled else "",
            )
        )
    _print_table(rows)
    return 0


def _client_disable(args: argparse.Namespace, server: AuthServer) -> int:
    if not server.clients.set_disabled(args.id):
        raise CommandError(f"no client '{args.id}'")
    print(f"Disabled client {args.id}")
    return 0


# -- launch contexts and keys ------------------------------------------------------------------


def _launch_create(args: argparse.Namespace, server: AuthServer) -> int:
    from fhir_server.storage.repository import ID_PATTERN

    for value in (args.patient, args.encounter):
        if value is not None and not ID_PATTERN.match(value):
            raise CommandError(f"'{value}' is not a valid FHIR id")
    for ref in args.context or []:
        rtype, _, rid = ref.partition("/")
        if not rtype.isalpha() or not ID_PATTERN.match(rid):
            raise CommandError(f"--context takes Type/id references, not '{ref}'")
    launch = server.grants.create_launch(
        patient=args.patient,
        encounter=args.encounter,
        fhir_context=args.context,
        ttl=args.ttl or server.settings.launch_ttl,
    )
    print(launch)
    return 0


def _key_rotate(_args: argparse.Namespace, server: AuthServer) -> int:
    kid = server.keys.rotate()
    print(f"New signing key {kid}; the previous one stays published for a day")
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


# -- parser ----------------------------------------------------------------------------------------


def add_auth_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``user``, ``client``, ``launch`` and ``key`` on the ``mso`` parser."""
    user = sub.add_parser("user", help="manage user accounts").add_subparsers(
        dest="user_command", required=True
    )
    create = user.add_parser("create", help="create a user (password from stdin or a prompt)")
    create.add_argument("--username", required=True)
    create.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    create.add_argument(
        "--role", required=True, choices=["admin", "requester", "provider", "patient"]
    )
    create.add_argument("--practitioner-role", help="PractitionerRole id the user acts as")
    create.add_argument("--organization", help="Organization id the user acts for")
    create.add_argument("--patient", help="Patient id (patient users)")
    create.add_argument("--fhir-user", help="Type/id of the user's FHIR resource (fhirUser)")
    create.add_argument("--totp", action="store_true", help="require a TOTP one-time code")
    create.set_defaults(func=_run(_user_create))
    user.add_parser("list", help="list users").set_defaults(func=_run(_user_list))
    for name in ("disable", "enable"):
        toggle = user.add_parser(name, help=f"{name} a user (disabling stops its tokens at once)")
        toggle.add_argument("--username", required=True)
        toggle.set_defaults(func=_run(_user_disable))

    client = sub.add_parser("client", help="manage client applications").add_subparsers(
        dest="client_command", required=True
    )
    create = client.add_parser(
        "create",
        help="register a client: --public, confidential (with redirect URIs), or backend "
        "(keys, no redirect URIs)",
    )
    create.add_argument("--id", required=True, help="client_id")
    create.add_argument("--redirect-uri", action="append", help="repeatable")
    create.add_argument("--public", action="store_true", help="no secret; PKCE required")
    create.add_argument("--secret-stdin", action="store_true", help="read the secret from stdin")
    create.add_argument("--jwks-url", help="where the client publishes its public keys")
    create.add_argument("--jwks-file", help="a JSON Web Key Set file with the client's keys")
    create.add_argument("--scope", help="scopes the client may be granted (space-separated)")
    create.add_argument("--organization", help="Organization id a backend client acts for")
    create.set_defaults(func=_run(_client_create))
    client.add_parser("list", help="list clients").set_defaults(func=_run(_client_list))
    disable = client.add_parser("disable", help="disable a client (stops its tokens at once)")
    disable.add_argument("--id", required=True)
    disable.set_defaults(func=_run(_client_disable))

    launch = sub.add_parser("launch", help="EHR launch contexts").add_subparsers(
        dest="launch_command", required=True
    )
    create = launch.add_parser("create", help="create a launch context; prints the launch id")
    create.add_argument("--patient", required=True)
    create.add_argument("--encounter")
    create.add_argument("--context", action="append", help="extra fhirContext Type/id")
    create.add_argument("--ttl", type=int, help="seconds the launch id stays valid")
    create.set_defaults(func=_run(_launch_create))

    key = sub.add_parser("key", help="server signing keys").add_subparsers(
        dest="key_command", required=True
    )
    key.add_parser("rotate", help="start signing with a new key").set_defaults(
        func=_run(_key_rotate)
    )
