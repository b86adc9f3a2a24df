"""``mso user …``, ``mso client …``, ``mso launch create``, ``mso key rotate`` and
``mso token issue``.

Secrets never go on the command line: passwords and client secrets are read from standard input
(``--password-stdin``, ``--secret-stdin``) or prompted for; a generated client secret and a TOTP
provisioning URI are printed once.

``mso token issue`` is the operator's way to a bearer token without an OAuth flow (like
``kubectl create token``): whoever can run it has the database anyway. The token is issued by
:meth:`TokenService.issue_access_token` exactly as the token endpoint issues one, within the
client's allowed scopes, and audited as a token event.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path

import orjson

from fhir_server.auth.principal import Role
from fhir_server.auth.scopes import ScopeError, ScopeSet
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
        email=args.email,
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


# -- tokens ----------------------------------------------------------------------------------------

MAX_TOKEN_LIFETIME = 86400
BACKEND_SCOPE = "system/*.cruds"
USER_SCOPE = "user/*.cruds openid fhirUser"
PATIENT_SCOPE = "patient/*.cruds"


def default_audience(settings: Settings) -> str:
    """The FHIR base URL an operator's token is for: ``MSO_BASE_URL``, else where ``mso serve``
    listens (``http://{MSO_HOST}:{MSO_PORT}/fhir``)."""
    if settings.base_url:
        return settings.base_url.rstrip("/")
    return f"http://{settings.host}:{settings.port}/fhir"


def _token_issue(args: argparse.Namespace, server: AuthServer) -> int:
    try:
        token, subject, scope, lifetime, audience = _issue_token(args, server)
    except (CommandError, ScopeError) as exc:
        _audit_token(server.settings, False, args.client_id, args.user, f"mso token issue: {exc}")
        raise
    _audit_token(server.settings, True, args.client_id, subject, "mso token issue")
    print(token)
    print(
        f"Access token for {subject} (client {args.client_id}), scopes '{scope}', "
        f"valid {lifetime} s, for {audience}",
        file=sys.stderr,
    )
    return 0


def _issue_token(args: argparse.Namespace, server: AuthServer) -> tuple[str, str, str, int, str]:
    """Check the request and issue the token; returns it with its subject, scope, lifetime and
    audience."""
    settings = server.settings
    lifetime = args.lifetime if args.lifetime is not None else settings.access_token_ttl
    if not 0 < lifetime <= MAX_TOKEN_LIFETIME:
        raise CommandError(f"--lifetime must be 1 to {MAX_TOKEN_LIFETIME} seconds")
    audience = (args.audience or default_audience(settings)).rstrip("/")
    if not audience.startswith(("http://", "https://")):
        raise CommandError("--audience must be an http(s) FHIR base URL")
    client = server.clients.get(args.client_id)
    if client is None:
        raise CommandError(f"no client '{args.client_id}' (register it with mso client create)")
    if client.disabled:
        raise CommandError(f"client '{args.client_id}' is disabled")
    user = None
    if args.user is not None:
        user = server.users.get(args.user)
        if user is None:
            raise CommandError(f"no user '{args.user}'")
        if user.disabled:
            raise CommandError(f"user '{args.user}' is disabled")
        default = PATIENT_SCOPE if user.role is Role.PATIENT else USER_SCOPE
    else:
        default = BACKEND_SCOPE
    requested = ScopeSet.parse(args.scope or default)
    _check_contexts(requested, user_role=user.role if user else None)
    granted = client.allowed_scopes.narrowed_to(requested)
    refused = [s.text for s in requested.resource_scopes if s not in granted.resource_scopes]
    refused += sorted(requested.other - granted.other)
    if refused:
        raise CommandError(
            f"client '{client.client_id}' may not be granted {' '.join(refused)} "
            f"(its scopes: {client.scope})"
        )
    scope = str(requested)
    if user is None:
        token = server.tokens.issue_access_token(
            client_id=client.client_id,
            scopes=scope,
            role=Role.SYSTEM,
            organization=client.organization,
            audience=audience,
            lifetime=lifetime,
        )
        return token, client.client_id, scope, lifetime, audience
    token = server.tokens.issue_for_user(
        user,
        client_id=client.client_id,
        scopes=scope,
        audience=audience,
        lifetime=lifetime,
    )
    return token, user.username, scope, lifetime, audience


def _check_contexts(requested: ScopeSet, *, user_role: Role | None) -> None:
    """A backend token carries only ``system/`` scopes; a user token none, and ``patient/``
    scopes only for a patient user (nothing else here gives a token a patient context)."""
    if not requested.resource_scopes:
        raise CommandError("ask for at least one resource scope (e.g. system/*.rs)")
    for scope in requested.resource_scopes:
        if user_role is None and scope.context != "system":
            raise CommandError(f"'{scope.text}': a token without --user takes system/ scopes")
        if user_role is not None and scope.context == "system":
            raise CommandError(f"'{scope.text}': system/ scopes are for tokens without --user")
        if scope.context == "patient" and user_role is not Role.PATIENT:
            raise CommandError(f"'{scope.text}': patient/ scopes are for patient users only")
    if user_role is None and requested.other:
        raise CommandError(
            f"'{' '.join(sorted(requested.other))}': a token without --user takes system/ scopes"
        )


def _audit_token(
    settings: Settings, success: bool, client_id: str, subject: str | None, detail: str
) -> None:
    """Record the token event in the audit trail, as the token endpoint does."""
    from fhir_server.audit.log import AuditLog
    from fhir_server.wiring import build_repository

    repo = build_repository(settings)
    audit = AuditLog(repo)
    try:
        audit.auth_event("token", success, subject=subject, client_id=client_id, detail=detail)
    finally:
        audit.close()
        repo.engine.dispose()


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


# -- parser ----------------------------------------------------------------------------------------


def add_auth_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``user``, ``client``, ``launch``, ``key`` and ``token`` on the ``mso`` parser."""
    user = sub.add_parser("user", help="manage user accounts").add_subparsers(
        dest="user_command", required=True
    )
    create = user.add_parser("create", help="create a user (password from stdin or a prompt)")
    create.add_argument("--username", required=True, help="login name of the new user")
    create.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin (default: prompt for it twice)",
    )
    create.add_argument(
        "--role",
        required=True,
        choices=["admin", "requester", "provider", "patient"],
        help="what the user may do: admin (everything), requester (submits cases for an "
        "organization), provider (a specialist answering cases), patient (own data)",
    )
    create.add_argument("--practitioner-role", help="PractitionerRole id the user acts as")
    create.add_argument("--organization", help="Organization id the user acts for")
    create.add_argument("--patient", help="Patient id (patient users)")
    create.add_argument("--fhir-user", help="Type/id of the user's FHIR resource (fhirUser)")
    create.add_argument("--totp", action="store_true", help="require a TOTP one-time code")
    create.add_argument("--email", help="address for notification emails when offline")
    create.set_defaults(func=_run(_user_create), creates_database=True)
    user.add_parser("list", help="list users").set_defaults(func=_run(_user_list))
    toggles = {
        "disable": (
            "disable a user: no more logins, its tokens stop working at once",
            "the user to disable",
        ),
        "enable": (
            "enable a disabled user again: it can sign in and be issued tokens",
            "the user to enable",
        ),
    }
    for name, (help_text, username_help) in toggles.items():
        toggle = user.add_parser(name, help=help_text)
        toggle.add_argument("--username", required=True, help=username_help)
        toggle.set_defaults(func=_run(_user_disable))

    client = sub.add_parser("client", help="manage client applications").add_subparsers(
        dest="client_command", required=True
    )
    create = client.add_parser(
        "create",
        help="register a client: --public, confidential (with redirect URIs), or backend "
        "(keys, no redirect URIs)",
    )
    create.add_argument("--id", required=True, help="the client_id to register")
    create.add_argument(
        "--redirect-uri",
        action="append",
        metavar="URI",
        help="an allowed OAuth redirect URI (repeat for several); none: a backend client",
    )
    create.add_argument("--public", action="store_true", help="no secret; PKCE required")
    create.add_argument("--secret-stdin", action="store_true", help="read the secret from stdin")
    create.add_argument("--jwks-url", help="where the client publishes its public keys")
    create.add_argument("--jwks-file", help="a JSON Web Key Set file with the client's keys")
    create.add_argument("--scope", help="scopes the client may be granted (space-separated)")
    create.add_argument("--organization", help="Organization id a backend client acts for")
    create.set_defaults(func=_run(_client_create), creates_database=True)
    client.add_parser("list", help="list clients").set_defaults(func=_run(_client_list))
    disable = client.add_parser("disable", help="disable a client (stops its tokens at once)")
    disable.add_argument("--id", required=True, help="client_id of the client to disable")
    disable.set_defaults(func=_run(_client_disable))

    launch = sub.add_parser("launch", help="EHR launch contexts").add_subparsers(
        dest="launch_command", required=True
    )
    create = launch.add_parser("create", help="create a launch context; prints the launch id")
    create.add_argument(
        "--patient", required=True, help="id of the Patient in context (the launch's patient)"
    )
    create.add_argument("--encounter", help="id of the Encounter in context (optional)")
    create.add_argument(
        "--context",
        action="append",
        metavar="TYPE/ID",
        help="an extra fhirContext reference, e.g. ServiceRequest/123 (repeat for several)",
    )
    create.add_argument("--ttl", type=int, help="seconds the launch id stays valid")
    create.set_defaults(func=_run(_launch_create))

    key = sub.add_parser("key", help="server signing keys").add_subparsers(
        dest="key_command", required=True
    )
    key.add_parser("rotate", help="start signing with a new key").set_defaults(
        func=_run(_key_rotate), creates_database=True
    )

    token = sub.add_parser("token", help="access tokens for operators").add_subparsers(
        dest="token_command", required=True
    )
    issue = token.add_parser(
        "issue",
        help="print a signed access token (backend token of a client, or acting as --user)",
        description="Print a signed access token, issued directly (no OAuth flow) and audited. "
        "Without --user it is a backend (system) token of the client; with --user it acts as "
        "that user. The scopes must be within the client's allowed scopes.",
    )
    issue.add_argument("--client-id", required=True, help="a registered, enabled client")
    issue.add_argument(
        "--scope",
        help=f"space-separated scopes (default: '{BACKEND_SCOPE}'; with --user "
        f"'{USER_SCOPE}', or '{PATIENT_SCOPE}' for a patient user)",
    )
    issue.add_argument("--user", metavar="USERNAME", help="act as this (enabled) user")
    issue.add_argument(
        "--lifetime",
        type=int,
        metavar="SECONDS",
        help=f"default: MSO_ACCESS_TOKEN_TTL; at most {MAX_TOKEN_LIFETIME} (24 h)",
    )
    issue.add_argument(
        "--audience",
        metavar="URL",
        help="FHIR base URL the token is for (default: MSO_BASE_URL, else "
        "http://{MSO_HOST}:{MSO_PORT}/fhir)",
    )
    issue.set_defaults(func=_run(_token_issue))
