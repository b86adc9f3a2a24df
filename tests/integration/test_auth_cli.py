"""``mso user``, ``mso client``, ``mso launch`` and ``mso key``: what they store is what the
authorization server then uses."""

from __future__ import annotations

import io

import orjson
import pyotp
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey

from fhir_server.cli import main
from tests.auth_helpers import token_by_code

REDIRECT = "https://app.example.org/cb"


def mso(db_url, *argv, stdin: str = "", monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["--database-url", db_url, *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def run(app, monkeypatch, capsys):
    db_url = app.state.settings.database_url

    def runner(*argv, stdin=""):
        return mso(db_url, *argv, stdin=stdin, monkeypatch=monkeypatch, capsys=capsys)

    return runner


def test_cli_user_client_and_launch_drive_an_ehr_launch(app, run, unique):
    name = f"cli-{unique[:8]}"
    code, out, _ = run(
        "user",
        "create",
        "--username",
        name,
        "--password-stdin",
        "--role",
        "provider",
        "--practitioner-role",
        f"pr-{unique[:6]}",
        "--organization",
        f"org-{unique[:6]}",
        stdin="s3cret-password\n",
    )
    assert code == 0 and f"Created user {name} (provider)" in out
    code, out, _ = run(
        "client",
        "create",
        "--id",
        f"app-{unique[:8]}",
        "--public",
        "--redirect-uri",
        REDIRECT,
        "--scope",
        "launch openid fhirUser patient/*.rs",
    )
    assert code == 0 and "Created public client" in out
    code, out, _ = run(
        "launch", "create", "--patient", f"p-{unique[:6]}", "--encounter", f"e-{unique[:6]}"
    )
    assert code == 0
    launch = out.strip()

    http = TestClient(
        app, base_url="http://testserver", follow_redirects=False, client=(f"ip-{unique[:8]}", 1)
    )
    body = token_by_code(
        http,
        client_id=f"app-{unique[:8]}",
        redirect_uri=REDIRECT,
        scope="launch openid fhirUser patient/*.rs",
        username=name,
        password="s3cret-password",
        launch=launch,
    ).json()
    assert body["patient"] == f"p-{unique[:6]}" and body["encounter"] == f"e-{unique[:6]}"
    principal = app.state.tokens.authenticate(f"Bearer {body['access_token']}")
    assert principal.practitioner_role == f"pr-{unique[:6]}"
    assert principal.fhir_user == f"PractitionerRole/pr-{unique[:6]}"

    code, out, _ = run("user", "list")
    assert name in out and "provider" in out
    code, out, _ = run("user", "disable", "--username", name)
    assert code == 0 and app.state.auth.users.get(name).disabled
    with pytest.raises(Exception) as info:
        app.state.tokens.authenticate(f"Bearer {body['access_token']}")
    assert info.value.code == "MSO-AUTH-006"


def test_cli_totp_and_generated_secret(app, run, unique):
    name = f"otp-{unique[:8]}"
    code, out, _ = run(
        "user",
        "create",
        "--username",
        name,
        "--password-stdin",
        "--role",
        "admin",
        "--totp",
        stdin="s3cret-password\n",
    )
    assert code == 0
    uri = out.split("TOTP provisioning URI (add it to an authenticator app): ")[1].strip()
    assert pyotp.parse_uri(uri).name == name
    code, out, _ = run(
        "client",
        "create",
        "--id",
        f"conf-{unique[:8]}",
        "--redirect-uri",
        REDIRECT,
        "--redirect-uri",
        REDIRECT + "2",
    )
    assert "Created confidential client" in out
    secret = out.split("Client secret (shown once, store it now): ")[1].strip()
    assert app.state.auth.clients.check_secret(f"conf-{unique[:8]}", secret) is not None
    assert app.state.auth.clients.get(f"conf-{unique[:8]}").redirect_uris == (
        REDIRECT,
        REDIRECT + "2",
    )
    code, out, _ = run(
        "client",
        "create",
        "--id",
        f"own-{unique[:8]}",
        "--redirect-uri",
        REDIRECT,
        "--secret-stdin",
        stdin="my-own-secret\n",
    )
    assert "Client secret" not in out
    assert app.state.auth.clients.check_secret(f"own-{unique[:8]}", "my-own-secret")


def test_cli_backend_client_from_a_jwks_file(app, run, unique, tmp_path):
    key = ECKey.generate_key("P-384", parameters={"kid": "k1"}, private=True)
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps({"keys": [key.as_dict(private=False)]}))
    code, out, _ = run(
        "client",
        "create",
        "--id",
        f"be-{unique[:8]}",
        "--jwks-file",
        str(path),
        "--scope",
        "system/*.rs",
        "--organization",
        f"org-{unique[:6]}",
    )
    assert code == 0 and "Created backend client" in out
    client = app.state.auth.clients.get(f"be-{unique[:8]}")
    assert client.kind == "backend" and client.organization == f"org-{unique[:6]}"
    code, out, _ = run("client", "list")
    assert f"be-{unique[:8]}" in out and "keys" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("user", "create", "--username", "x y", "--password-stdin", "--role", "admin"),
            "user names",
        ),
        (
            ("user", "create", "--username", "pat", "--password-stdin", "--role", "patient"),
            "--patient",
        ),
        (("user", "disable", "--username", "nobody-at-all"), "no user"),
        (("client", "create", "--id", "nokeys"), "backend client needs"),
        (
            (
                "client",
                "create",
                "--id",
                "s",
                "--public",
                "--redirect-uri",
                REDIRECT,
                "--scope",
                "user/Nope.rs",
            ),
            "unknown resource type",
        ),
        (("launch", "create", "--patient", "bad id"), "not a valid FHIR id"),
    ],
)
def test_cli_errors(run, argv, message):
    code, _, err = run(*argv, stdin="long-enough-password\n")
    assert code == 2
    assert message in err


def test_cli_key_rotate(app, run, unique):
    before, _ = app.state.tokens.keys.signing_key()
    code, out, _ = run("key", "rotate")
    assert code == 0
    new_kid = out.split()[3].rstrip(";")
    assert new_kid != before
    # every process signs with the new key from its next key refresh on
    from fhir_server.auth.tokens import TokenService

    fresh = TokenService(app.state.tokens.engine, app.state.settings)
    assert fresh.keys.signing_key()[0] == new_kid
    assert before in {k["kid"] for k in fresh.keys.jwks()["keys"]}


# -- mso token issue -------------------------------------------------------------------------------

AUDIENCE = "http://testserver/fhir"


@pytest.fixture
def audited(monkeypatch):
    """The token events ``mso token issue`` hands to the audit log."""
    from fhir_server.audit.log import AuditLog

    events: list[tuple[str, bool, dict]] = []
    monkeypatch.setattr(
        AuditLog, "auth_event", lambda _self, kind, ok, **kw: events.append((kind, ok, kw))
    )
    return events


@pytest.fixture(autouse=True)
def _learn_new_keys_at_once(monkeypatch):
    """``test_cli_key_rotate`` may just have rotated the signing key: a server learns a new kid
    within 5 s; these tests should not wait for that."""
    monkeypatch.setattr("fhir_server.auth.keys.UNKNOWN_KID_RELOAD_SECONDS", 0.0)


def fhir_get(app, token: str, path: str = "/fhir/Patient?_count=1"):
    http = TestClient(app, base_url="http://testserver", follow_redirects=False)
    return http.get(path, headers={"Authorization": f"Bearer {token}"})


def make_user(run, name: str, role: str, *extra: str) -> None:
    argv = ("user", "create", "--username", name, "--password-stdin", "--role", role, *extra)
    assert run(*argv, stdin="s3cret-password\n")[0] == 0


def public_client(run, client_id: str, *extra: str) -> None:
    argv = ("client", "create", "--id", client_id, "--public", "--redirect-uri", REDIRECT)
    assert run(*argv, *extra)[0] == 0


def backend_client(run, client_id: str, tmp_path, scope: str, *extra: str) -> None:
    key = ECKey.generate_key("P-384", parameters={"kid": "k1"}, private=True)
    path = tmp_path / f"{client_id}.json"
    path.write_bytes(orjson.dumps({"keys": [key.as_dict(private=False)]}))
    code, _, err = run(
        "client", "create", "--id", client_id, "--jwks-file", str(path), "--scope", scope, *extra
    )
    assert code == 0, err


def test_token_issue_backend_token_works(app, run, unique, tmp_path, audited):
    client_id = f"op-{unique[:8]}"
    backend_client(run, client_id, tmp_path, "system/*.cruds", "--organization", "org-x")
    code, out, err = run("token", "issue", "--client-id", client_id, "--audience", AUDIENCE)
    assert code == 0, err
    token = out.strip()
    assert len(out.splitlines()) == 1 and token.count(".") == 2  # only the token on stdout
    assert fhir_get(app, token).status_code == 200
    principal = app.state.tokens.authenticate(f"Bearer {token}")
    assert principal.role.value == "system" and principal.subject == client_id
    assert principal.client_id == client_id and principal.organization == "org-x"
    assert str(principal.scopes) == "system/*.cruds"
    claims = app.state.tokens.claims_if_signed(token)
    assert claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == app.state.settings.access_token_ttl
    assert audited == [
        ("token", True, {"subject": client_id, "client_id": client_id, "detail": "mso token issue"})
    ]
    # disabling the client stops the token at once
    assert run("client", "disable", "--id", client_id)[0] == 0
    assert fhir_get(app, token).status_code == 401


def test_token_issue_as_a_user(app, run, unique, monkeypatch):
    monkeypatch.setenv("MSO_BASE_URL", AUDIENCE)  # the default audience
    name, client_id = f"adm-{unique[:8]}", f"cli-{unique[:8]}"
    make_user(run, name, "admin")
    public_client(run, client_id)
    argv = ("--client-id", client_id, "--user", name, "--lifetime", "600")
    code, out, err = run("token", "issue", *argv)
    assert code == 0, err
    token = out.strip()
    http = TestClient(app, base_url="http://testserver", follow_redirects=False)
    created = http.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "name": [{"family": f"Op{unique[:6]}"}]},
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text
    principal = app.state.tokens.authenticate(f"Bearer {token}")
    assert principal.role.value == "admin" and principal.subject == name
    assert principal.client_id == client_id
    assert principal.scopes.has("openid") and principal.scopes.has("fhirUser")
    assert [s.text for s in principal.scopes.resource_scopes] == ["user/*.cruds"]
    claims = app.state.tokens.claims_if_signed(token)
    assert claims["exp"] - claims["iat"] == 600 and claims["aud"] == AUDIENCE

    patient_user, patient_id = f"pat-{unique[:8]}", created.json()["id"]
    make_user(run, patient_user, "patient", "--patient", patient_id)
    code, out, err = run("token", "issue", "--client-id", client_id, "--user", patient_user)
    assert code == 0, err
    principal = app.state.tokens.authenticate(f"Bearer {out.strip()}")
    assert principal.role.value == "patient" and principal.patient == patient_id
    assert principal.fhir_user == f"Patient/{patient_id}"
    assert str(principal.scopes) == "patient/*.cruds"
    assert fhir_get(app, out.strip(), f"/fhir/Patient/{patient_id}").status_code == 200
    assert fhir_get(app, out.strip(), f"/fhir/Patient?_id={patient_id}").status_code == 200
    assert fhir_get(app, out.strip(), "/fhir/Patient?_summary=count").json()["total"] == 1


def test_token_issue_default_audience_is_where_mso_serve_listens(app, run, unique, monkeypatch):
    monkeypatch.delenv("MSO_BASE_URL", raising=False)
    monkeypatch.setenv("MSO_HOST", "127.0.0.9")
    monkeypatch.setenv("MSO_PORT", "18123")
    name, client_id = f"aud-{unique[:8]}", f"aud-{unique[:8]}"
    make_user(run, name, "admin")
    public_client(run, client_id)
    code, out, _ = run("token", "issue", "--client-id", client_id, "--user", name)
    assert code == 0
    claims = app.state.tokens.claims_if_signed(out.strip())
    assert claims["aud"] == "http://127.0.0.9:18123/fhir"
    assert claims["iss"] == "http://127.0.0.9:18123"
    assert fhir_get(app, out.strip()).status_code == 401  # not meant for http://testserver/fhir


def test_token_issue_refusals(app, run, unique, tmp_path, audited):
    limited, public = f"lim-{unique[:8]}", f"pub-{unique[:8]}"
    backend_client(run, limited, tmp_path, "system/*.rs")
    public_client(run, public, "--scope", "user/*.rs openid")
    off = f"off-{unique[:8]}"
    backend_client(run, off, tmp_path, "system/*.cruds")
    run("client", "disable", "--id", off)
    user, gone = f"usr-{unique[:8]}", f"dis-{unique[:8]}"
    for name in (user, gone):
        make_user(run, name, "provider")
    run("user", "disable", "--username", gone)
    audited.clear()
    cases = [
        (("--client-id", f"nobody-{unique[:8]}"), "no client"),
        (("--client-id", off), "is disabled"),
        (("--client-id", limited), "may not be granted system/*.cruds"),
        (("--client-id", limited, "--scope", "system/*.rs system/Patient.cud"), "Patient.cud"),
        (("--client-id", limited, "--scope", "user/*.rs"), "without --user takes system/"),
        (("--client-id", limited, "--scope", "system/Nope.rs"), "unknown resource type"),
        (("--client-id", limited, "--scope", "system/*.rs", "--lifetime", "86401"), "--lifetime"),
        (("--client-id", public, "--user", gone), f"user '{gone}' is disabled"),
        (("--client-id", public, "--user", f"ghost-{unique[:8]}"), "no user"),
        (("--client-id", public, "--user", user), "may not be granted user/*.cruds fhirUser"),
        (("--client-id", public, "--user", user, "--scope", "system/*.rs"), "for tokens without"),
        (("--client-id", public, "--user", user, "--scope", "patient/*.rs"), "patient users"),
    ]
    for argv, message in cases:
        code, out, err = run("token", "issue", *argv, "--audience", AUDIENCE)
        assert (code, out) == (2, ""), argv
        assert message in err, (argv, err)
    assert len(audited) == len(cases)
    assert all(kind == "token" and not ok for kind, ok, _ in audited)
    # within the client's scopes, the same clients and user do get tokens
    for argv in (
        ("--client-id", limited, "--scope", "system/Patient.rs"),
        ("--client-id", public, "--user", user, "--scope", "user/Patient.rs openid"),
    ):
        code, out, err = run("token", "issue", *argv, "--audience", AUDIENCE)
        assert code == 0, err
        assert fhir_get(app, out.strip()).status_code == 200
