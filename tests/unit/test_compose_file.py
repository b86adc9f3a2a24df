"""``docker-compose.yml`` stays in step with the code: every ``MSO_*`` variable it sets is a
setting the process reads, every service has a healthcheck, images are pinned, and the services
reach each other on the ports they listen on. A compose validator checks the whole file when one
is installed (``docker compose`` or Debian's ``docker-compose``; neither needs a daemon)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from dicom_gateway.config import GatewaySettings
from fhir_server.config import Settings
from tests.required_tools import missing_tool

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
FHIR_SERVICES = ("server", "worker")
GATEWAY = "gateway"
# The port each backing service listens on inside the network (their images' defaults, or
# what the file configures for them).
LISTENS = {"postgres": 5432, "orthanc": 8042, "mailpit": 1025}
_DEFAULT = re.compile(r"\$\{[A-Z0-9_]+:-([^}]*)\}")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _resolved(value: object) -> str:
    """A value with each ``${NAME:-default}`` replaced by its default, as compose would with
    nothing set."""
    return _DEFAULT.sub(lambda m: m.group(1), str(value))


def _environment(service: str) -> dict[str, str]:
    env = _services()[service].get("environment") or {}
    if isinstance(env, list):  # the NAME=value form
        env = dict(item.partition("=")[::2] for item in env)
    return {name: _resolved(value) for name, value in env.items()}


def _container_ports(service: str) -> set[int]:
    """The container side of each published port (``[ip:]host:container``)."""
    return {
        int(str(item).rsplit(":", 1)[-1].split("/")[0])
        for item in _services()[service].get("ports", [])
    }


def _health_text(service: str) -> str:
    test = _services()[service]["healthcheck"]["test"]
    return _resolved(" ".join(test) if isinstance(test, list) else test)


def test_server_and_worker_set_only_server_settings() -> None:
    fields = {f"MSO_{name.upper()}" for name in Settings.model_fields}
    for service in FHIR_SERVICES:
        names = {n for n in _environment(service) if n.startswith("MSO_")}
        assert names, service
        assert sorted(names - fields) == [], f"{service}: not settings of fhir_server.config"


def test_gateway_sets_only_gateway_settings() -> None:
    fields = {f"MSO_DICOM_{name.upper()}" for name in GatewaySettings.model_fields}
    names = {n for n in _environment(GATEWAY) if n.startswith("MSO_")}
    assert names
    assert sorted(names - fields) == [], "not settings of dicom_gateway.config.GatewaySettings"


ONE_SHOT = {"gateway-client"}
"""Services that run once and exit (no healthcheck): what depends on them waits for success."""


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies() -> None:
    services = _services()
    assert set(services) >= ONE_SHOT
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        if name in ONE_SHOT:
            assert "restart" not in service, f"{name} runs once"
        else:
            assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for other, how in depends.items():
            assert other in services, (name, other)
            wanted = "service_completed_successfully" if other in ONE_SHOT else "service_healthy"
            assert how == {"condition": wanted}, (name, other)


def test_the_gateway_syncs_with_the_key_its_client_was_registered_with() -> None:
    services = _services()
    gateway, client = services["gateway"], services["gateway-client"]
    env = gateway["environment"]
    assert urlsplit(env["MSO_DICOM_FHIR_BASE_URL"]).hostname == "server"
    key_dir = env["MSO_DICOM_PRIVATE_KEY"].rsplit("/", 1)[0]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in gateway["volumes"]}
    assert mounts["gateway-keys"] == key_dir
    assert {v.split(":")[0]: v.split(":")[1] for v in client["volumes"]}["gateway-keys"] == key_dir
    command = " ".join(client["command"])
    assert env["MSO_DICOM_PRIVATE_KEY"] in command
    assert f"--id {env['MSO_DICOM_CLIENT_ID']}" in command


def test_images_are_pinned() -> None:
    for name, service in _services().items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        if "build" in service or image.startswith("mso-fhir-server:"):
            continue  # built from this repository's Dockerfile
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"


def test_the_image_built_here_is_the_one_the_other_services_run() -> None:
    services = _services()
    built = [s["image"] for s in services.values() if "build" in s]
    assert len(built) == 1
    for name in (*FHIR_SERVICES, GATEWAY):
        assert services[name]["image"] == built[0], name


def test_orthanc_is_reached_at_the_orthanc_service() -> None:
    port = int(_environment("orthanc").get("ORTHANC__HTTP_PORT", LISTENS["orthanc"]))
    assert port == LISTENS["orthanc"]
    urls = {
        "MSO_ORTHANC_URL": _environment("server"),
        "MSO_DICOM_ORTHANC_URL": _environment(GATEWAY),
    }
    for variable, env in urls.items():
        url = urlsplit(env.get(variable, ""))
        assert (url.hostname, url.port) == ("orthanc", port), variable
    assert f":{port}/" in _health_text("orthanc")


def test_database_and_mail_relay_are_reached_on_their_ports() -> None:
    for service in FHIR_SERVICES:
        env = _environment(service)
        db = urlsplit(env["MSO_DATABASE_URL"])
        assert (db.hostname, db.port) == ("postgres", LISTENS["postgres"]), service
        assert env["MSO_SMTP_HOST"] == "mailpit", service
        assert int(env["MSO_SMTP_PORT"]) == LISTENS["mailpit"], service
    bind = _environment("mailpit").get("MP_SMTP_BIND_ADDR", f"0.0.0.0:{LISTENS['mailpit']}")
    assert bind.rsplit(":", 1)[1] == str(LISTENS["mailpit"])
    assert f"-p {LISTENS['postgres']}" in _health_text("postgres")


def test_server_and_gateway_listen_where_they_are_published_and_probed() -> None:
    server = _environment("server")
    port = int(server["MSO_PORT"])
    assert _container_ports("server") == {port}
    assert f"--port {port}" in " ".join(_services()["server"]["command"])
    assert f"127.0.0.1:{port}/fhir/metadata" in _health_text("server")
    gateway = _environment(GATEWAY)
    dicom = int(gateway["MSO_DICOM_PORT"])
    assert _container_ports(GATEWAY) == {dicom}
    assert f"'127.0.0.1', {dicom}" in _health_text(GATEWAY)
    assert f"ae_title='{gateway['MSO_DICOM_AET']}'" in _health_text(GATEWAY)
    assert gateway["MSO_DICOM_HOST"] == "0.0.0.0"


def _validator() -> list[str] | None:
    """A compose command that validates without a daemon: ``docker compose`` (v2) when the
    plugin is there, else Debian's ``docker-compose`` (v1.29)."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_a_compose_validator_accepts_the_file(tmp_path: Path) -> None:
    command = _validator()
    if command is None:
        missing_tool(
            "no compose validator: neither `docker compose` nor `docker-compose` is installed "
            "(Debian package docker-compose)"
        )
    no_env = tmp_path / "empty.env"  # a developer's .env must not decide the outcome
    no_env.write_text("")
    args = ["--file", str(COMPOSE), "--project-directory", str(ROOT), "--env-file", str(no_env)]
    result = subprocess.run(
        [*command, *args, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
