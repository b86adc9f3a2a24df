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
from tests.auth_helpers import browser_authorize, pkce_pair

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
    verifier, challenge = pkce_pair()
    query = browser_authorize(
        http,
        client_id=f"app-{unique[:8]}",
        redirect_uri=REDIRECT,
        scope="launch openid fhirUser patient/*.rs",
        username=name,
        password="s3cret-password",
        challenge=challenge,
        launch=launch,
    )
    body = http.post(
        "/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": query["code"],
            "redirect_uri": REDIRECT,
            "client_id": f"app-{unique[:8]}",
            "code_verifier": verifier,
        },
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
