"""FHIR Bulk Data export (issue 17) in-process, on SQLite and PostgreSQL, with real SMART Backend
Services clients: kick-off (system, Patient, Group) -> poll -> download, what each client gets
(exactly what the same token's search returns, chat never), the parameters, cancel, the error
paths of the kick-off, and the audit trail.

https://hl7.org/fhir/uv/bulkdata/STU3/export.html

Each backend gets a module database of its own and an app with ``bulk_worker=False``: jobs run
only when a test calls ``app.state.bulk.run_pending()``, so every step is deterministic.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_server.auth.resource_kinds import is_chat
from fhir_server.codes import (
    CASE_CATEGORY_SECOND_OPINION,
    CASE_CATEGORY_SYSTEM,
    COMMUNICATION_CATEGORY_SYSTEM,
    COMMUNICATION_CHAT,
)
from tests.auth_helpers import token_for
from tests.conftest import BACKENDS, _make_db, make_settings
from tests.integration.bulk_helpers import (
    SUBSETTED,
    BackendClient,
    accepted,
    check_manifest,
    deleted_refs,
    download,
    exported,
    job_id_of,
    kick_off,
    outcome_code,
    parameters,
    register_backend_client,
    search_all,
    search_count,
    token_endpoint,
    wait_manifest,
)

BASE = "http://testserver/fhir"
LOINC = "http://loinc.org"
HEART_RATE, WEIGHT = "8867-4", "29463-7"
LENIENT = "respond-async, handling=lenient"
# What the world holds; a system export covers at least these types.
WORLD_TYPES = (
    "Organization",
    "PractitionerRole",
    "Patient",
    "ServiceRequest",
    "Task",
    "Observation",
    "Condition",
    "DocumentReference",
    "Binary",
    "Communication",
    "Group",
)


# -- the module's app and world ------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def bulk_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A database of this module's own: a system export sees exactly the world below."""
    yield from _make_db(request.param, tmp_path_factory.mktemp(f"bulk-{request.param}"))


@pytest.fixture(scope="module")
def app(bulk_db: str, tmp_path_factory: pytest.TempPathFactory):
    """The app of this module (overrides the session ``app``): no bulk worker thread."""
    from fhir_server.app import create_app

    built = create_app(
        make_settings(bulk_db, tmp_path_factory.mktemp("bulk-data"), bulk_worker=False)
    )
    yield built
    built.state.repo.engine.dispose()


@dataclass
class World:
    """Two requesting organizations, their cases and everything hanging off them."""

    app: Any
    http: TestClient
    token_url: str
    ids: dict[str, str]
    types: dict[str, str]
    chat: set[str] = field(default_factory=set)

    def ref(self, key: str) -> str:
        return f"{self.types[key]}/{self.ids[key]}"

    def refs(self, *keys: str) -> set[str]:
        return {self.ref(k) for k in keys}

    def backend(
        self, *, organization: str | None = None, scope: str = "system/*.rs"
    ) -> BackendClient:
        """A new backend client (own key, own id) bound to ``organization`` (a world key)."""
        org = self.ids[organization] if organization else None
        return register_backend_client(
            self.app.state.auth.clients, self.token_url, scope=scope, organization=org
        )

    def run(self) -> int:
        """Run every queued export job now."""
        return self.app.state.bulk.run_pending()


def _ref(rtype: str, rid: str) -> dict[str, str]:
    return {"reference": f"{rtype}/{rid}"}


def _world_resources(ids: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    """Everything but chat, in write order (roles before cases: the case projection reads the
    requester's organization)."""

    def obs(patient: str, code: str, status: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "status": status,
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": _ref("Patient", ids[patient]),
            "valueQuantity": {"value": 72, "unit": "/min"},
        }

    def case(patient: str, requester: str) -> dict[str, Any]:
        return {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "category": [
                {"coding": [{"system": CASE_CATEGORY_SYSTEM, "code": CASE_CATEGORY_SECOND_OPINION}]}
            ],
            "subject": _ref("Patient", ids[patient]),
            "requester": _ref("PractitionerRole", ids[requester]),
        }

    def group(*members: str) -> dict[str, Any]:
        return {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": _ref("Patient", ids[m])} for m in members],
        }

    def condition(patient: str) -> dict[str, Any]:
        return {
            "resourceType": "Condition",
            "subject": _ref("Patient", ids[patient]),
            "code": {"text": "tumour"},
        }

    return [
        ("orgA", {"resourceType": "Organization", "name": "Hospital A"}),
        ("orgB", {"resourceType": "Organization", "name": "Insurer B"}),
        (
            "rqA",
            {"resourceType": "PractitionerRole", "organization": _ref("Organization", ids["orgA"])},
        ),
        (
            "rqB",
            {"resourceType": "PractitionerRole", "organization": _ref("Organization", ids["orgB"])},
        ),
        ("pv1", {"resourceType": "PractitionerRole", "active": True}),
        *(
            (
                p,
                {
                    "resourceType": "Patient",
                    "name": [{"family": f"Doe-{p}", "given": ["Sam"]}],
                    "gender": "other",
                },
            )
            for p in ("pA1", "pA2", "pB1", "pX")
        ),
        ("caseA1", case("pA1", "rqA")),
        ("caseA2", case("pA2", "rqA")),
        ("caseB1", case("pB1", "rqB")),
        ("hrA1f", obs("pA1", HEART_RATE, "final")),
        ("hrA1p", obs("pA1", HEART_RATE, "preliminary")),
        ("wtA1", obs("pA1", WEIGHT, "final")),
        ("hrA2f", obs("pA2", HEART_RATE, "final")),
        ("wtA2", obs("pA2", WEIGHT, "amended")),
        ("hrB1f", obs("pB1", HEART_RATE, "final")),
        ("wtB1", obs("pB1", WEIGHT, "final")),
        ("hrXf", obs("pX", HEART_RATE, "final")),
        ("condA1", condition("pA1")),
        ("condA2", condition("pA2")),
        ("condB1", condition("pB1")),
        (
            "docA1",
            {
                "resourceType": "DocumentReference",
                "status": "current",
                "subject": _ref("Patient", ids["pA1"]),
                "context": {"related": [_ref("ServiceRequest", ids["caseA1"])]},
                "content": [
                    {
                        "attachment": {
                            "contentType": "text/plain",
                            "url": f"Binary/{ids['binDocA1']}",
                        }
                    }
                ],
            },
        ),
        (
            "binDocA1",
            {
                "resourceType": "Binary",
                "contentType": "text/plain",
                "securityContext": _ref("DocumentReference", ids["docA1"]),
                "data": "bGV0dGVy",
            },
        ),
        (
            "letterA1",
            {
                "resourceType": "Communication",
                "status": "completed",
                "subject": _ref("Patient", ids["pA1"]),
                "payload": [{"contentString": "referral letter sent"}],
            },
        ),
        ("gA", group("pA1", "pA2")),
        ("gB", group("pB1")),
        ("gAB", group("pA1", "pB1")),
    ]


TYPES = {
    "orgA": "Organization",
    "orgB": "Organization",
    "rqA": "PractitionerRole",
    "rqB": "PractitionerRole",
    "pv1": "PractitionerRole",
    "pA1": "Patient",
    "pA2": "Patient",
    "pB1": "Patient",
    "pX": "Patient",
    "caseA1": "ServiceRequest",
    "caseA2": "ServiceRequest",
    "caseB1": "ServiceRequest",
    "taskA1": "Task",
    "taskA2": "Task",
    "taskB1": "Task",
    "hrA1f": "Observation",
    "hrA1p": "Observation",
    "wtA1": "Observation",
    "hrA2f": "Observation",
    "wtA2": "Observation",
    "hrB1f": "Observation",
    "wtB1": "Observation",
    "hrXf": "Observation",
    "condA1": "Condition",
    "condA2": "Condition",
    "condB1": "Condition",
    "docA1": "DocumentReference",
    "binDocA1": "Binary",
    "letterA1": "Communication",
    "gA": "Group",
    "gB": "Group",
    "gAB": "Group",
    "chatA1": "Communication",
    "binChatA1": "Binary",
    "chatB1": "Communication",
}
# What each organization's system client may see of the world (its cases, their patients and
# everything about them, the directory); chat excluded, as export never has it.
ORG_A = {
    "orgA", "orgB", "rqA", "rqB", "pv1", "pA1", "pA2", "caseA1", "caseA2", "taskA1", "taskA2",
    "hrA1f", "hrA1p", "wtA1", "hrA2f", "wtA2", "condA1", "condA2", "docA1", "binDocA1",
    "letterA1", "gA", "gAB",
}  # fmt: skip
ORG_B = {
    "orgA", "orgB", "rqA", "rqB", "pv1", "pB1", "caseB1", "taskB1", "hrB1f", "wtB1", "condB1",
    "gB", "gAB",
}  # fmt: skip


def _chat(ids: dict[str, str], key: str, case: str, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "id": ids[key],
        "status": "completed",
        "category": [
            {"coding": [{"system": COMMUNICATION_CATEGORY_SYSTEM, "code": COMMUNICATION_CHAT}]}
        ],
        "basedOn": [_ref("ServiceRequest", ids[case])],
        "subject": _ref("Patient", ids[patient]),
        "payload": [{"contentString": f"chat {ids[key]}"}],
    }


def _put_all(http: TestClient, headers: dict[str, str], bodies: list[dict[str, Any]]) -> None:
    entries = [
        {
            "resource": body,
            "request": {"method": "PUT", "url": f"{body['resourceType']}/{body['id']}"},
        }
        for body in bodies
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = http.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 200, response.text


def _assign_cases(app: Any, http: TestClient, ids: dict[str, str]) -> None:
    """The server made each case's workflow Task when its ServiceRequest was stored: they are
    assigned to the provider and accepted (server work, as the workflow does), so that each
    case has the two parties of a chat. Their ids become ``task<case>`` of the world."""
    admin = {"Authorization": f"Bearer {token_for(app, role='admin')}"}
    for case in ("caseA1", "caseA2", "caseB1"):
        found = search_all(http, f"{BASE}/Task", admin, [("focus", f"ServiceRequest/{ids[case]}")])
        assert len(found) == 1, found
        task = found[0]
        ids["task" + case.removeprefix("case")] = task["id"]
        assigned = {
            **task,
            "status": "accepted",
            "owner": _ref("PractitionerRole", ids["pv1"]),
        }
        app.state.repo.write(lambda tx, t=assigned: tx.update("Task", t["id"], t))


@pytest.fixture(scope="module")
def world(app) -> World:
    """The world: everything but chat as server work, chat by its requesters over HTTP."""
    u = uuid.uuid4().hex[:8]
    ids = {key: f"{key.lower()}-{u}" for key in TYPES}
    resources = _world_resources(ids)

    def work(tx: Any) -> None:
        for key, body in resources:
            tx.update(TYPES[key], ids[key], {**body, "id": ids[key]})

    app.state.repo.write(work)
    http = TestClient(app, base_url="http://testserver", follow_redirects=False)
    _assign_cases(app, http, ids)
    for org, role, keys in (("orgA", "rqA", ("chatA1", "binChatA1")), ("orgB", "rqB", ("chatB1",))):
        token = token_for(
            app,
            role="requester",
            organization=ids[org],
            practitioner_role=ids[role],
            scopes="user/*.cruds",
        )
        bodies = []
        for key in keys:
            if TYPES[key] == "Communication":
                case, patient = ("caseA1", "pA1") if org == "orgA" else ("caseB1", "pB1")
                bodies.append(_chat(ids, key, case, patient))
            else:
                bodies.append(
                    {
                        "resourceType": "Binary",
                        "id": ids[key],
                        "contentType": "text/plain",
                        "securityContext": _ref("Communication", ids["chatA1"]),
                        "data": "Y2hhdA==",
                    }
                )
        _put_all(http, {"Authorization": f"Bearer {token}"}, bodies)
    built = World(app, http, token_endpoint(http, BASE), ids, dict(TYPES))
    built.chat = built.refs("chatA1", "binChatA1", "chatB1")
    return built


# -- helpers of the assertions ------------------------------------------------------------------


def _refs(resources: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [f"{rtype}/{r['id']}" for rtype, items in resources.items() for r in items]


def _export(
    world: World,
    headers: dict[str, str],
    url: str = f"{BASE}/$export",
    **kw: Any,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Kick off, run, poll, download: (manifest, resources by type); no duplicates."""
    status_url = accepted(kick_off(world.http, url, headers, **kw))
    manifest = wait_manifest(world.http, status_url, headers, run=world.run)
    resources = exported(world.http, manifest, headers)
    refs = _refs(resources)
    assert len(refs) == len(set(refs)), "a resource exported twice"
    assert not set(refs) & world.chat, "chat was exported"
    for rtype, items in resources.items():
        assert not any(is_chat(rtype, r) for r in items), "chat was exported"
    return manifest, resources


def _search_refs(
    world: World, headers: dict[str, str], path: str, params: list[tuple[str, str]] | None = None
) -> set[str]:
    """What the same token's search finds, chat taken out (export never carries it)."""
    found = search_all(world.http, f"{BASE}/{path}", headers, params)
    return {f"{r['resourceType']}/{r['id']}" for r in found if not is_chat(r["resourceType"], r)}


def _assert_equals_search(
    world: World,
    headers: dict[str, str],
    resources: dict[str, list[dict[str, Any]]],
    types: set[str],
    params: list[tuple[str, str]] | None = None,
) -> None:
    """Per type (those exported and ``types``), the export equals the search of that type with
    ``params`` and the same token."""
    for rtype in sorted(types | set(resources)):
        got = {f"{rtype}/{r['id']}" for r in resources.get(rtype, ())}
        assert got == _search_refs(world, headers, rtype, params), rtype


# -- kick-off, status, download -----------------------------------------------------------------


def test_system_export_round_trip_equals_the_same_tokens_search(world: World) -> None:
    platform = world.backend()
    headers = platform.headers(world.http, "system/*.rs")
    response = kick_off(world.http, f"{BASE}/$export", headers)
    status_url = accepted(response)
    assert status_url.startswith(f"{BASE}/_bulk/")
    # queued: 202 with progress and a hint when to come back
    queued = world.http.get(status_url, headers=headers)
    assert queued.status_code == 202, queued.text
    assert queued.headers["x-progress"] and int(queued.headers["retry-after"]) >= 0
    assert world.run() >= 1
    assert world.run() == 0  # nothing left queued
    manifest = wait_manifest(world.http, status_url, headers)
    check_manifest(manifest)
    assert "$export" in manifest["request"]
    assert manifest.get("deleted", []) == []  # no _since: nothing to report deleted
    assert manifest.get("error", []) == []
    resources = exported(world.http, manifest, headers)
    refs = _refs(resources)
    assert len(refs) == len(set(refs))
    # every resource of the world but chat, and each type exactly as its search
    assert world.refs(*ORG_A, *ORG_B, "pX", "hrXf") <= set(refs)
    assert not set(refs) & world.chat
    _assert_equals_search(world, headers, resources, set(WORLD_TYPES))
    # the manifest's counts are the search totals of the same token
    counts: dict[str, int] = {}
    for item in manifest["output"]:
        counts[item["type"]] = counts.get(item["type"], 0) + item["count"]
    for rtype in ("Patient", "Observation", "Condition", "Group", "ServiceRequest"):
        assert counts[rtype] == search_count(world.http, f"{BASE}/{rtype}", headers), rtype


def test_post_kick_off_with_parameters(world: World) -> None:
    client = world.backend(organization="orgA")
    headers = client.headers(world.http)
    body = parameters(
        ("_type", "valueString", "Patient,Condition"),
        ("_outputFormat", "valueString", "application/fhir+ndjson"),
    )
    _, resources = _export(world, headers, body=body)
    assert set(resources) == {"Patient", "Condition"}
    assert set(_refs(resources)) == world.refs("pA1", "pA2", "condA1", "condA2")


@pytest.mark.parametrize("fmt", ["application/fhir+ndjson", "application/ndjson", "ndjson"])
def test_output_formats(world: World, fmt: str) -> None:
    headers = world.backend(organization="orgB").headers(world.http)
    _, resources = _export(world, headers, params={"_type": "Patient", "_outputFormat": fmt})
    assert set(_refs(resources)) == world.refs("pB1")


def test_each_organizations_client_gets_only_its_cases_and_patients(world: World) -> None:
    for org, expected, other in (("orgA", ORG_A, ORG_B), ("orgB", ORG_B, ORG_A)):
        headers = world.backend(organization=org).headers(world.http)
        _, resources = _export(world, headers)
        refs = set(_refs(resources))
        assert world.refs(*expected) <= refs, org
        assert not refs & world.refs(*(other - expected), "pX", "hrXf"), org
        _assert_equals_search(world, headers, resources, set(WORLD_TYPES))


def test_chat_is_never_exported_not_even_to_the_platform(world: World) -> None:
    types = "Communication,Binary"
    # an organization's client reads its case's chat by search, and still never exports it
    org_headers = world.backend(organization="orgA").headers(world.http)
    assert world.ref("chatA1") in {
        f"Communication/{r['id']}"
        for r in search_all(world.http, f"{BASE}/Communication", org_headers)
    }
    _, resources = _export(world, org_headers, params={"_type": types})
    assert set(_refs(resources)) == world.refs("letterA1", "binDocA1")
    # the platform's client (bound to no organization) neither
    platform = world.backend().headers(world.http)
    _, resources = _export(world, platform, params={"_type": types})
    assert world.refs("letterA1", "binDocA1") <= set(_refs(resources))
    _assert_equals_search(world, platform, resources, {"Communication", "Binary"})
    # nor through a patient's compartment or a _typeFilter naming it
    _, resources = _export(world, org_headers, f"{BASE}/Patient/$export", params={"_type": types})
    assert world.refs("letterA1") <= set(_refs(resources))
    chat_filter = f"Communication?_id={world.ids['chatA1']}"
    _, resources = _export(
        world, platform, params={"_type": "Communication", "_typeFilter": chat_filter}
    )
    assert resources == {}


# -- Patient and Group level ----------------------------------------------------------------------


def _compartment(
    world: World, headers: dict[str, str], patients: list[str], types: tuple[str, ...]
) -> set[str]:
    """Union of the patients' compartments (``Patient/{id}/{type}`` searches) and the patients."""
    found: set[str] = set()
    for pid in patients:
        found.add(f"Patient/{pid}")
        for rtype in types:
            found |= _search_refs(world, headers, f"Patient/{pid}/{rtype}")
    return found


COMPARTMENT_TYPES = (
    "ServiceRequest",
    "Task",
    "Observation",
    "Condition",
    "DocumentReference",
    "Communication",
    "Group",
)


def test_patient_level_export_covers_the_visible_patients_compartments(world: World) -> None:
    headers = world.backend(organization="orgA").headers(world.http)
    _, resources = _export(world, headers, f"{BASE}/Patient/$export")
    refs = set(_refs(resources))
    patients = [world.ids["pA1"], world.ids["pA2"]]
    assert refs == _compartment(world, headers, patients, COMPARTMENT_TYPES)
    assert (
        world.refs("pA1", "pA2", "caseA1", "hrA1f", "wtA2", "condA2", "docA1", "letterA1") <= refs
    )
    assert not refs & world.refs("pB1", "pX", "hrB1f", "orgA", "rqA", "binDocA1")
    # POST with patient: that patient's compartment only
    body = parameters(
        ("patient", "valueReference", {"reference": world.ref("pA2")}),
        ("_type", "valueString", "Patient,Observation,Condition"),
    )
    _, resources = _export(world, headers, f"{BASE}/Patient/$export", body=body)
    assert set(_refs(resources)) == world.refs("pA2", "hrA2f", "wtA2", "condA2")


def test_patient_parameter_for_a_patient_out_of_reach_exports_nothing_of_it(world: World) -> None:
    """Naming another organization's patient reveals none of its data: at most what the
    client sees anyway (a Group of its own that also lists that patient)."""
    headers = world.backend(organization="orgA").headers(world.http)
    body = parameters(("patient", "valueReference", {"reference": world.ref("pB1")}))
    response = kick_off(world.http, f"{BASE}/Patient/$export", headers, body=body)
    if response.status_code != 202:
        assert response.status_code in (400, 404), response.text
        return
    manifest = wait_manifest(
        world.http, response.headers["content-location"], headers, run=world.run
    )
    refs = set(_refs(exported(world.http, manifest, headers)))
    assert refs <= world.refs("gAB"), refs


def test_group_level_export_covers_the_members_the_client_may_see(world: World) -> None:
    headers = world.backend(organization="orgA").headers(world.http)
    _, resources = _export(world, headers, f"{BASE}/Group/{world.ids['gA']}/$export")
    refs = set(_refs(resources))
    patients = [world.ids["pA1"], world.ids["pA2"]]
    assert refs - world.refs("gA", "gAB") == _compartment(
        world, headers, patients, COMPARTMENT_TYPES
    ) - world.refs("gA", "gAB")
    assert not refs & world.refs("pB1", "pX", "hrB1f", "caseB1")
    # a Group with a member of another organization: only the visible member's data
    _, resources = _export(
        world,
        headers,
        f"{BASE}/Group/{world.ids['gAB']}/$export",
        params={"_type": "Patient,Observation"},
    )
    assert set(_refs(resources)) == world.refs("pA1", "hrA1f", "hrA1p", "wtA1")
    # the other organization's Group and an unknown one are not found
    for gid in (world.ids["gB"], f"nope-{uuid.uuid4().hex[:8]}"):
        response = kick_off(world.http, f"{BASE}/Group/{gid}/$export", headers)
        assert response.status_code == 404, response.text
        assert response.json()["resourceType"] == "OperationOutcome"


def test_group_level_export_with_patient_parameter(world: World) -> None:
    headers = world.backend(organization="orgA").headers(world.http)
    body = parameters(
        ("patient", "valueReference", {"reference": world.ref("pA1")}),
        ("_type", "valueString", "Patient,Condition"),
    )
    _, resources = _export(world, headers, f"{BASE}/Group/{world.ids['gA']}/$export", body=body)
    assert set(_refs(resources)) == world.refs("pA1", "condA1")


# -- parameters -----------------------------------------------------------------------------------


def test_type_and_type_filters_ored_per_type(world: World) -> None:
    headers = world.backend(organization="orgA").headers(world.http)
    filters = [
        ("_typeFilter", f"Observation?code={LOINC}|{HEART_RATE}&status=final"),
        ("_typeFilter", f"Observation?code={LOINC}|{WEIGHT}"),
    ]
    params = [("_type", "Observation,Condition"), *filters]
    _, resources = _export(world, headers, params=params)
    assert set(resources) == {"Observation", "Condition"}
    observations = {f"Observation/{r['id']}" for r in resources["Observation"]}
    assert observations == world.refs("hrA1f", "hrA2f", "wtA1", "wtA2")
    expected = _search_refs(
        world, headers, "Observation", [("code", f"{LOINC}|{HEART_RATE}"), ("status", "final")]
    )
    expected |= _search_refs(world, headers, "Observation", [("code", f"{LOINC}|{WEIGHT}")])
    assert observations == expected
    # a type without a filter is exported whole
    assert {f"Condition/{r['id']}" for r in resources["Condition"]} == world.refs(
        "condA1", "condA2"
    )


def test_elements_subsets_and_tags(world: World) -> None:
    headers = world.backend(organization="orgA").headers(world.http)
    _, resources = _export(
        world, headers, params={"_type": "Patient,Condition", "_elements": "name"}
    )
    assert set(_refs(resources)) == world.refs("pA1", "pA2", "condA1", "condA2")
    for patient in resources["Patient"]:
        assert set(patient) <= {"resourceType", "id", "meta", "name"}, patient
        assert patient["name"][0]["family"].startswith("Doe-")
        assert "gender" not in patient
        tags = {(t.get("system"), t.get("code")) for t in patient["meta"].get("tag", ())}
        assert SUBSETTED in tags
    # type-qualified: Patient.gender applies to Patients only
    _, resources = _export(
        world, headers, params={"_type": "Patient,Condition", "_elements": "Patient.gender"}
    )
    for patient in resources["Patient"]:
        assert set(patient) <= {"resourceType", "id", "meta", "gender"}, patient
        assert patient["gender"] == "other"


def _stamp(stored: Any) -> datetime:
    return (
        stored.last_updated
        if stored.last_updated.tzinfo
        else stored.last_updated.replace(tzinfo=UTC)
    )


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_since_until_and_deleted(world: World) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = {k: f"{k}-{tag}" for k in ("old1", "old2", "gone", "changed", "new1", "new2")}

    def obs(key: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": ids[key],
            "status": "final",
            "code": {"coding": [{"system": "urn:bulk-test", "code": tag}]},
            "subject": _ref("Patient", world.ids["pX"]),
        }

    repo = world.app.state.repo
    first = repo.write(
        lambda tx: [
            tx.update("Observation", ids[k], obs(k))[0] for k in ("old1", "old2", "gone", "changed")
        ]
    )
    time.sleep(0.05)
    boundary = max(_stamp(s) for s in first) + timedelta(milliseconds=20)
    time.sleep(0.05)
    later = repo.write(
        lambda tx: [
            *(tx.update("Observation", ids[k], obs(k))[0] for k in ("new1", "new2")),
            tx.update("Observation", ids["changed"], {**obs("changed"), "status": "amended"})[0],
            tx.delete("Observation", ids["gone"]),
        ]
    )
    assert min(_stamp(s) for s in later) > boundary
    since = _instant(boundary)
    headers = world.backend().headers(world.http)
    ours = [("code", f"urn:bulk-test|{tag}")]
    filters = {"_type": "Observation", "_typeFilter": f"Observation?code=urn:bulk-test|{tag}"}

    manifest, resources = _export(world, headers, params={**filters, "_since": since})
    got = set(_refs(resources))
    assert got == {f"Observation/{ids[k]}" for k in ("new1", "new2", "changed")}
    assert got == _search_refs(
        world, headers, "Observation", [*ours, ("_lastUpdated", f"gt{since}")]
    )
    # the deletion since then is listed in `deleted`
    assert f"Observation/{ids['gone']}" in deleted_refs(world.http, manifest, headers)

    # everything of the world since then, without a filter: nothing but these writes
    manifest, resources = _export(world, headers, params={"_since": since})
    assert (
        set(_refs(resources)) - {r for r in _refs(resources) if r.startswith("Provenance/")} == got
    )
    assert f"Observation/{ids['gone']}" in deleted_refs(world.http, manifest, headers)

    manifest, resources = _export(world, headers, params={**filters, "_until": since})
    got = set(_refs(resources))
    assert got == {f"Observation/{ids[k]}" for k in ("old1", "old2")}
    assert got == _search_refs(
        world, headers, "Observation", [*ours, ("_lastUpdated", f"lt{since}")]
    )

    # a window: _since and _until together
    end = _instant(max(_stamp(s) for s in later if s is not None) + timedelta(seconds=1))
    _, resources = _export(world, headers, params={**filters, "_since": since, "_until": end})
    assert set(_refs(resources)) == {f"Observation/{ids[k]}" for k in ("new1", "new2", "changed")}
    # the exported version is the current one
    changed = next(r for r in resources["Observation"] if r["id"] == ids["changed"])
    assert changed["status"] == "amended" and changed["meta"]["versionId"] == "2"


def test_type_outside_the_scopes_is_forbidden(world: World) -> None:
    client = world.backend(organization="orgA", scope="system/Patient.rs system/Observation.rs")
    headers = client.headers(world.http, "system/Patient.rs system/Observation.rs")
    response = kick_off(
        world.http, f"{BASE}/$export", headers, params={"_type": "Patient,Condition"}
    )
    assert response.status_code == 403, response.text
    assert outcome_code(response) == "MSO-BULK-403"
    # without _type: the permitted types only
    _, resources = _export(world, headers)
    assert set(resources) <= {"Patient", "Observation"}
    assert set(_refs(resources)) == world.refs(
        "pA1", "pA2", "hrA1f", "hrA1p", "wtA1", "hrA2f", "wtA2"
    )
    # a token that may not read at all cannot export
    writer = world.backend(organization="orgA", scope="system/Patient.c")
    response = kick_off(
        world.http, f"{BASE}/$export", writer.headers(world.http, "system/Patient.c")
    )
    assert response.status_code == 403, response.text


def _provenance(world: World, key: str, *targets: str) -> None:
    """A Provenance of ``targets`` (world keys), stored as server work."""
    world.types[key] = "Provenance"
    world.ids[key] = f"{key.lower()}-{uuid.uuid4().hex[:8]}"
    body = {
        "resourceType": "Provenance",
        "id": world.ids[key],
        "target": [{"reference": world.ref(t)} for t in targets],
        "recorded": "2024-05-01T10:00:00Z",
        "agent": [{"who": _ref("Organization", world.ids["orgA"])}],
    }
    world.app.state.repo.write(lambda tx: tx.update("Provenance", body["id"], body))


def test_include_associated_provenance(world: World) -> None:
    """``includeAssociatedData=RelevantProvenanceResources``: the Provenance of the exported
    resources comes along, and only theirs (IG 3.0.0, export parameters)."""
    _provenance(world, "provA1", "pA1")
    _provenance(world, "provCondA1", "condA1")
    headers = world.backend(organization="orgA").headers(world.http)
    params = {"_type": "Patient", "includeAssociatedData": "RelevantProvenanceResources"}
    _, resources = _export(world, headers, params=params)
    assert set(resources) == {"Patient", "Provenance"}
    assert {f"Patient/{r['id']}" for r in resources["Patient"]} == world.refs("pA1", "pA2")
    assert {f"Provenance/{r['id']}" for r in resources["Provenance"]} == world.refs("provA1")
    # without it, no Provenance for a _type that does not name it
    _, resources = _export(world, headers, params={"_type": "Patient"})
    assert set(resources) == {"Patient"}


def test_the_provenance_of_chat_is_not_exported(world: World) -> None:
    """The requester's chat writes have Provenance naming the messages (who wrote to whom,
    when): chat never leaves, so neither do they."""
    chat_targets = {ref for ref in world.chat}
    for org in ("orgA", None):
        headers = world.backend(organization=org).headers(world.http)
        _, resources = _export(world, headers, params={"_type": "Provenance"})
        for provenance in resources.get("Provenance", ()):
            targets = {t["reference"].split("/_history/")[0] for t in provenance["target"]}
            assert not targets & chat_targets, (org, provenance["target"])


# -- cancel ---------------------------------------------------------------------------------------


def _bulk_files(app: Any) -> set[Path]:
    settings = app.state.settings
    folder = settings.bulk_dir or settings.data_dir / "bulk"
    return {p for p in Path(folder).rglob("*") if p.is_file()}


def test_cancel_a_queued_and_a_completed_export(world: World) -> None:
    headers = world.backend(organization="orgB").headers(world.http)
    # queued
    status_url = accepted(kick_off(world.http, f"{BASE}/$export", headers))
    cancelled = world.http.delete(status_url, headers=headers)
    assert cancelled.status_code == 202, cancelled.text
    assert world.http.get(status_url, headers=headers).status_code == 404
    assert world.run() == 0
    assert world.http.delete(status_url, headers=headers).status_code == 404
    # completed: its files go with it
    before = _bulk_files(world.app)
    status_url = accepted(kick_off(world.http, f"{BASE}/$export", headers))
    manifest = wait_manifest(world.http, status_url, headers, run=world.run)
    urls = [item["url"] for item in manifest["output"]]
    assert urls and all(download(world.http, url, headers) for url in urls)
    assert _bulk_files(world.app) - before, "the export wrote no file under bulk_dir"
    cancelled = world.http.delete(status_url, headers=headers)
    assert cancelled.status_code == 202, cancelled.text
    assert world.http.get(status_url, headers=headers).status_code == 404
    for url in urls:
        assert world.http.get(url, headers=headers).status_code == 404
    assert not _bulk_files(world.app) - before, "files of a cancelled export are left"


def test_expired_exports_are_purged_with_their_files(world: World) -> None:
    """After ``bulk_retention_hours`` a completed export and its files are removed (here a
    second app on the same database with no retention, its worker's purge run by hand)."""
    from fhir_server.app import create_app

    settings = world.app.state.settings
    brief = create_app(
        make_settings(
            settings.database_url,
            settings.data_dir,
            bulk_worker=False,
            bulk_retention_hours=0.0,
            bulk_dir=settings.bulk_dir,
        )
    )
    http = TestClient(brief, base_url="http://testserver")
    headers = world.backend(organization="orgB").headers(http)
    status_url = accepted(kick_off(http, f"{BASE}/$export", headers, params={"_type": "Patient"}))
    assert brief.state.bulk.run_pending() == 1
    manifest = wait_manifest(http, status_url, headers)
    url = manifest["output"][0]["url"]
    job_files = {p for p in _bulk_files(world.app) if job_id_of(status_url) in str(p)}
    assert job_files
    time.sleep(0.01)
    assert brief.state.bulk.purge() >= 1
    assert http.get(status_url, headers=headers).status_code == 404
    assert http.get(url, headers=headers).status_code == 404
    assert not any(p.exists() for p in job_files)
    brief.state.repo.engine.dispose()


# -- what a client may not do ---------------------------------------------------------------------


def test_another_clients_job_and_files_are_not_found(world: World) -> None:
    mine = world.backend(organization="orgA").headers(world.http)
    status_url = accepted(
        kick_off(world.http, f"{BASE}/$export", mine, params={"_type": "Patient"})
    )
    manifest = wait_manifest(world.http, status_url, mine, run=world.run)
    url = manifest["output"][0]["url"]
    for other in (
        world.backend(organization="orgA").headers(world.http),  # same organization, other client
        world.backend().headers(world.http),  # the platform's client
        {"Authorization": f"Bearer {token_for(world.app, role='admin')}"},
    ):
        assert world.http.get(status_url, headers=other).status_code == 404
        assert world.http.get(url, headers=other).status_code == 404
        assert world.http.delete(status_url, headers=other).status_code == 404
    # no token: 401 (the manifest says requiresAccessToken)
    for path in (url, status_url):
        response = world.http.get(path)
        assert response.status_code == 401, response.text
    response = world.http.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert response.status_code == 401
    # the owner still can; an unknown job or file is 404
    assert download(world.http, url, mine)
    unknown = f"{BASE}/_bulk/{uuid.uuid4().hex}"
    assert world.http.get(unknown, headers=mine).status_code == 404
    assert world.http.get(f"{status_url}/nope.ndjson", headers=mine).status_code == 404
    assert world.http.get(f"{status_url}/..%2F..%2Fmso.db", headers=mine).status_code == 404
    assert job_id_of(status_url) in url


UNHAPPY = [
    # (id, path, params, prefer, status, code)
    ("no-prefer", "$export", {}, None, 400, "MSO-BULK-001"),
    ("prefer-sync", "$export", {}, "return=representation", 400, "MSO-BULK-001"),
    ("unknown-parameter", "$export", {"_foo": "1"}, "respond-async", 400, "MSO-BULK-002"),
    ("bad-format", "$export", {"_outputFormat": "text/csv"}, "respond-async", 400, "MSO-BULK-003"),
    ("bad-format-lenient", "$export", {"_outputFormat": "text/csv"}, LENIENT, 400, "MSO-BULK-003"),
    ("bad-since", "$export", {"_since": "yesterday"}, "respond-async", 400, "MSO-BULK-004"),
    (
        "since-no-zone",
        "$export",
        {"_since": "2024-01-01T10:00:00"},
        "respond-async",
        400,
        "MSO-BULK-004",
    ),
    (
        "bad-until",
        "$export",
        {"_until": "2024-13-01T00:00:00Z"},
        "respond-async",
        400,
        "MSO-BULK-004",
    ),
    ("unknown-type", "$export", {"_type": "Patient,Foo"}, "respond-async", 400, "MSO-BULK-005"),
    (
        "organize-by",
        "$export",
        {"organizeOutputBy": "Patient"},
        "respond-async",
        400,
        "MSO-BULK-009",
    ),
    (
        "bad-type-filter",
        "$export",
        {"_typeFilter": "Observation?nonsense=1"},
        "respond-async",
        400,
        "MSO-BULK-006",
    ),
    (
        "bad-type-filter-value",
        "$export",
        {"_typeFilter": "Observation?date=soon"},
        "respond-async",
        400,
        "MSO-BULK-006",
    ),
    (
        "type-filter-no-type",
        "$export",
        {"_typeFilter": "code=1"},
        "respond-async",
        400,
        "MSO-BULK-006",
    ),
    (
        "type-filter-unknown-type",
        "$export",
        {"_typeFilter": "Foo?code=1"},
        "respond-async",
        400,
        "MSO-BULK-006",
    ),
    (
        "patient-on-get",
        "Patient/$export",
        {"patient": "Patient/x"},
        "respond-async",
        400,
        "MSO-BULK-007",
    ),
    ("bad-elements", "$export", {"_elements": "name.family"}, "respond-async", 400, "MSO-BULK-008"),
    ("unknown-group", "Group/no-such-group/$export", {}, "respond-async", 404, None),
]


@pytest.mark.parametrize(
    ("path", "params", "prefer", "status", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in UNHAPPY],
)
def test_kick_off_errors(
    world: World,
    path: str,
    params: dict[str, str],
    prefer: str | None,
    status: int,
    code: str | None,
) -> None:
    headers = world.backend(organization="orgA").headers(world.http)
    response = kick_off(world.http, f"{BASE}/{path}", headers, params=params, prefer=prefer)
    assert response.status_code == status, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    if code is not None:
        assert outcome_code(response) == code
    assert "content-location" not in response.headers


def test_lenient_handling_ignores_unknown_types_and_parameters(world: World) -> None:
    headers = world.backend(organization="orgB").headers(world.http)
    params = {"_type": "Patient,Foo", "_foo": "1", "organizeOutputBy": "Patient"}
    _, resources = _export(world, headers, params=params, prefer=LENIENT)
    assert set(_refs(resources)) == world.refs("pB1")


def test_allow_partial_manifests_is_accepted(world: World) -> None:
    headers = world.backend(organization="orgB").headers(world.http)
    _, resources = _export(
        world, headers, params={"_type": "Patient", "allowPartialManifests": "true"}
    )
    assert set(_refs(resources)) == world.refs("pB1")


def test_too_many_jobs_of_one_client_is_429(world: World) -> None:
    client = world.backend(organization="orgA")
    headers = client.headers(world.http)
    limit = world.app.state.settings.bulk_max_jobs_per_client
    queued = [accepted(kick_off(world.http, f"{BASE}/$export", headers)) for _ in range(limit)]
    refused = kick_off(world.http, f"{BASE}/$export", headers)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) > 0
    # another client of the same organization is not held back
    other = world.backend(organization="orgA").headers(world.http)
    extra = accepted(kick_off(world.http, f"{BASE}/$export", other, params={"_type": "Patient"}))
    # a cancelled job frees its place
    assert world.http.delete(queued[0], headers=headers).status_code == 202
    queued[0] = accepted(
        kick_off(world.http, f"{BASE}/$export", headers, params={"_type": "Group"})
    )
    for url in queued:
        assert world.http.delete(url, headers=headers).status_code == 202
    assert world.http.delete(extra, headers=other).status_code == 202
    assert world.run() == 0


def test_a_user_token_exports_what_its_user_sees(world: World) -> None:
    """Not only backend clients: a requester's own token (user/ scopes) exports its
    organization's data, chat excluded, and nobody else's."""
    token = token_for(
        world.app,
        role="requester",
        organization=world.ids["orgA"],
        practitioner_role=world.ids["rqA"],
        scopes="user/*.rs",
    )
    headers = {"Authorization": f"Bearer {token}"}
    response = kick_off(
        world.http, f"{BASE}/Patient/$export", headers, params={"_type": "Patient,Communication"}
    )
    status_url = accepted(response)
    manifest = wait_manifest(world.http, status_url, headers, run=world.run)
    resources = exported(world.http, manifest, headers)
    assert set(_refs(resources)) == world.refs("pA1", "pA2", "letterA1")


# -- audit ----------------------------------------------------------------------------------------


def _events(world: World, who: str) -> list[dict[str, Any]]:
    world.app.state.audit.flush()
    admin = {"Authorization": f"Bearer {token_for(world.app, role='admin')}"}
    bundle = world.http.get(
        f"{BASE}/AuditEvent", params={"altid": who, "_count": "200"}, headers=admin
    )
    assert bundle.status_code == 200, bundle.text
    return [e["resource"] for e in bundle.json().get("entry", ()) if e["search"]["mode"] == "match"]


def _about(event: dict[str, Any], needle: str) -> bool:
    import orjson

    return needle in orjson.dumps(event).decode()


def _operations(world: World, who: str) -> list[tuple[str, str]]:
    """(operation, outcome) of the client's FHIR interaction events, oldest first."""
    out = []
    for event in reversed(_events(world, who)):
        names = [e["name"] for e in event.get("entity", ()) if "name" in e]
        if event["type"]["code"] == "rest" and names:
            out.append((names[0], event["outcome"]))
    return out


def test_kick_off_status_download_and_cancel_are_audited(world: World) -> None:
    client = world.backend(organization="orgA")
    headers = client.headers(world.http)
    status_url = accepted(
        kick_off(world.http, f"{BASE}/$export", headers, params={"_type": "Patient"})
    )
    assert _operations(world, client.client_id) == [("$export", "0")]
    manifest = wait_manifest(world.http, status_url, headers, run=world.run)
    download(world.http, manifest["output"][0]["url"], headers)
    assert world.http.delete(status_url, headers=headers).status_code == 202
    assert world.http.get(status_url, headers=headers).status_code == 404
    assert _operations(world, client.client_id) == [
        ("$export", "0"),
        ("$export-status", "0"),
        ("$export-download", "0"),
        ("$export-cancel", "0"),
        ("$export-status", "4"),
    ]
    # a refused kick-off is audited as a failure, its reason included
    kick_off(world.http, f"{BASE}/$export", headers, prefer=None)
    refused = next(e for e in _events(world, client.client_id) if e["outcome"] != "0")
    assert "respond-async" in refused["outcomeDesc"]
    # the trail never holds exported content
    assert not any(_about(e, "Doe-pA") for e in _events(world, client.client_id))


def test_module_database_is_this_modules_own(world: World, bulk_db: str) -> None:
    """Guard of the fixtures: the world was written to the database the app uses."""
    assert world.app.state.settings.database_url == bulk_db


@pytest.fixture(autouse=True)
def _no_jobs_left_queued(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used the world, no job is left for the next one to run."""
    yield
    if "world" in request.fixturenames:
        world: World = request.getfixturevalue("world")
        world.run()
