"""The MSO access policy, role x resource x path (DESIGN.md, Access; issue 4).

One small world of two requesting organizations, two providers, their cases and everything
hanging off them, then every role through every path that can reach a resource: read, vread,
instance/type/system history, search by id, ``_include`` / ``_revinclude``, chains, ``_has``,
``$everything``, transaction and batch entries, and writes. A resource must be reachable by
exactly the roles in EXPECTED and leak through no path to the others.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_server.codes import (
    TASK_CODE_CASE,
    TASK_CODE_CASE_ISSUE,
    TASK_CODE_SYSTEM,
    USERNAME_SYSTEM,
)

ROLES = ("reqA", "reqB", "prov1", "prov2", "admin", "patP1")
ALL = frozenset(ROLES)

# resource key -> roles that may see it
EXPECTED: dict[str, frozenset[str]] = {
    "orgA": ALL,
    "p1": frozenset({"reqA", "prov1", "admin", "patP1"}),
    # reqA has a (rejected) case about p2: the requester keeps it, the provider lost it
    "p2": frozenset({"reqA", "reqB", "prov2", "admin"}),
    "p3": frozenset({"reqA", "admin"}),  # created by requester A, in no case yet
    "caseA1": frozenset({"reqA", "prov1", "admin", "patP1"}),
    "taskA1": frozenset({"reqA", "prov1", "admin", "patP1"}),
    "caseA2": frozenset({"reqA", "admin"}),
    "taskA2": frozenset({"reqA", "admin"}),
    "caseB1": frozenset({"reqB", "prov2", "admin"}),
    "taskB1": frozenset({"reqB", "prov2", "admin"}),
    "docA1": frozenset({"reqA", "prov1", "admin", "patP1"}),
    # about p2 (whom reqA may see) but part of B's case: not reqA's
    "docB1": frozenset({"reqB", "prov2", "admin"}),
    "obsP2": frozenset({"reqA", "reqB", "prov2", "admin"}),
    "drA1": frozenset({"reqA", "prov1", "admin", "patP1"}),
    "issueA1": frozenset({"reqA", "prov1", "admin", "patP1"}),
    # chat: the case's requester and provider only, never admins
    "chatA1": frozenset({"reqA", "prov1"}),
    "binChat": frozenset({"reqA", "prov1"}),
    "binDoc": frozenset({"reqA", "prov1", "admin", "patP1"}),
    # an in-app notification: its recipient (and admins)
    "noteA": frozenset({"reqA", "admin"}),
    # for its recipient only, although the patient's compartment holds it
    "noteP1": frozenset({"patP1", "admin"}),
    # addressed to a user account rather than a FHIR identity
    "noteUserB": frozenset({"reqB", "admin"}),
    # billing: the requester side reads the Invoice, the provider does not
    "invA1": frozenset({"reqA", "admin", "patP1"}),
}
TYPES = {
    "orgA": "Organization",
    "p1": "Patient",
    "p2": "Patient",
    "p3": "Patient",
    "caseA1": "ServiceRequest",
    "caseA2": "ServiceRequest",
    "caseB1": "ServiceRequest",
    "taskA1": "Task",
    "taskA2": "Task",
    "taskB1": "Task",
    "docA1": "DocumentReference",
    "docB1": "DocumentReference",
    "obsP2": "Observation",
    "drA1": "DiagnosticReport",
    "issueA1": "Task",
    "chatA1": "Communication",
    "binChat": "Binary",
    "binDoc": "Binary",
    "noteA": "Communication",
    "noteP1": "Communication",
    "noteUserB": "Communication",
    "invA1": "Invoice",
}


@dataclass
class World:
    """Ids of the world's resources and a client per role."""

    ids: dict[str, str]
    clients: dict[str, TestClient]
    secret: str

    def ref(self, key: str) -> str:
        return f"{TYPES[key]}/{self.ids[key]}"

    def key_of(self, rtype: str, rid: str) -> str | None:
        return next((k for k, v in self.ids.items() if v == rid and TYPES[k] == rtype), None)


def _token(app: Any, username: str, role: str, scopes: str, **claims: str) -> str:
    from fhir_server.auth.users import UserStore

    engine = app.state.repo.engine
    users = UserStore(engine)
    users.create(username=username, password="correct horse", role=role, **claims)
    user = users.get(username)
    assert user is not None
    return app.state.tokens.issue_access_token(
        client_id="matrix",
        scopes=scopes,
        role=role,
        username=username,
        fhir_user=user.fhir_user,
        **claims,
    )


def _ref(rtype: str, rid: str) -> dict[str, str]:
    return {"reference": f"{rtype}/{rid}"}


def _build(app: Any, client: TestClient) -> World:
    u = uuid.uuid4().hex[:10]
    ids = {k: f"{k.lower()}-{u}" for k in TYPES}
    secret = f"secret{u}"
    org_b, role_a, role_b, role_p1, role_p2 = (
        f"{n}-{u}" for n in ("orgb", "ra", "rb", "rp1", "rp2")
    )
    text = {"status": "final", "code": {"text": "x"}}

    def task(key: str, case: str, patient: str, owner: str, status: str) -> dict[str, Any]:
        return {
            "resourceType": "Task",
            "status": status,
            "intent": "order",
            "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_CASE}]},
            "focus": _ref("ServiceRequest", ids[case]),
            "for": _ref("Patient", ids[patient]),
            "owner": _ref("PractitionerRole", owner),
        }

    def case(patient: str, requester: str) -> dict[str, Any]:
        return {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "subject": _ref("Patient", ids[patient]),
            "requester": _ref("PractitionerRole", requester),
        }

    resources: list[tuple[str, str, dict[str, Any]]] = [
        ("Organization", ids["orgA"], {"resourceType": "Organization", "name": "A"}),
        ("Organization", org_b, {"resourceType": "Organization", "name": "B"}),
    ]
    for rid, org in ((role_a, ids["orgA"]), (role_b, org_b), (role_p1, None), (role_p2, None)):
        body: dict[str, Any] = {"resourceType": "PractitionerRole", "active": True}
        if org:
            body["organization"] = _ref("Organization", org)
        resources.append(("PractitionerRole", rid, body))
    for key in ("p1", "p2"):
        patient = {"resourceType": "Patient", "name": [{"family": f"{key}{secret}"}]}
        resources.append(("Patient", ids[key], patient))
    resources += [
        ("ServiceRequest", ids["caseA1"], case("p1", role_a)),
        ("ServiceRequest", ids["caseA2"], case("p2", role_a)),
        ("ServiceRequest", ids["caseB1"], case("p2", role_b)),
        ("Task", ids["taskA1"], task("taskA1", "caseA1", "p1", role_p1, "accepted")),
        ("Task", ids["taskA2"], task("taskA2", "caseA2", "p2", role_p1, "rejected")),
        ("Task", ids["taskB1"], task("taskB1", "caseB1", "p2", role_p2, "in-progress")),
    ]
    for key, patient, kase in (("docA1", "p1", "caseA1"), ("docB1", "p2", "caseB1")):
        resources.append(
            (
                "DocumentReference",
                ids[key],
                {
                    "resourceType": "DocumentReference",
                    "status": "current",
                    "description": f"{key}{secret}",
                    "subject": _ref("Patient", ids[patient]),
                    "context": {"related": [_ref("ServiceRequest", ids[kase])]},
                    "content": [{"attachment": {"url": f"Binary/{ids['binDoc']}"}}],
                },
            )
        )
    resources += [
        (
            "Observation",
            ids["obsP2"],
            {
                "resourceType": "Observation",
                **text,
                "subject": _ref("Patient", ids["p2"]),
                "derivedFrom": [_ref("DocumentReference", ids["docB1"])],
            },
        ),
        (
            "DiagnosticReport",
            ids["drA1"],
            {
                "resourceType": "DiagnosticReport",
                **text,
                "basedOn": [_ref("ServiceRequest", ids["caseA1"])],
                "subject": _ref("Patient", ids["p1"]),
            },
        ),
        (
            "Task",
            ids["issueA1"],
            {
                "resourceType": "Task",
                "status": "requested",
                "intent": "order",
                "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_CASE_ISSUE}]},
                "partOf": [_ref("Task", ids["taskA1"])],
                "for": _ref("Patient", ids["p1"]),
            },
        ),
        (
            "Communication",
            ids["chatA1"],
            {
                "resourceType": "Communication",
                "status": "completed",
                "basedOn": [_ref("ServiceRequest", ids["caseA1"])],
                "subject": _ref("Patient", ids["p1"]),
                "payload": [{"contentString": f"chat {secret}"}],
            },
        ),
        (
            "Binary",
            ids["binChat"],
            {
                "resourceType": "Binary",
                "contentType": "text/plain",
                "securityContext": _ref("Communication", ids["chatA1"]),
                "data": "aGk=",
            },
        ),
        (
            "Binary",
            ids["binDoc"],
            {
                "resourceType": "Binary",
                "contentType": "text/plain",
                "securityContext": _ref("DocumentReference", ids["docA1"]),
                "data": "aGk=",
            },
        ),
    ]
    notification = {
        "system": "https://mso.example.org/fhir/CodeSystem/communication-category",
        "code": "notification",
    }
    resources += [
        (
            "Communication",
            ids["noteA"],
            {
                "resourceType": "Communication",
                "status": "completed",
                "category": [{"coding": [notification]}],
                "recipient": [_ref("PractitionerRole", role_a)],
                "about": [_ref("ServiceRequest", ids["caseA1"])],
                "payload": [{"contentString": "Case updated"}],
            },
        ),
        (
            "Communication",
            ids["noteP1"],
            {
                "resourceType": "Communication",
                "status": "completed",
                "category": [{"coding": [notification]}],
                "recipient": [_ref("Patient", ids["p1"])],
                "payload": [{"contentString": "Your case was updated"}],
            },
        ),
        (
            "Communication",
            ids["noteUserB"],
            {
                "resourceType": "Communication",
                "status": "completed",
                "category": [{"coding": [notification]}],
                "recipient": [{"identifier": {"system": USERNAME_SYSTEM, "value": f"reqb-{u}"}}],
                "payload": [{"contentString": "Case updated"}],
            },
        ),
        (
            "Invoice",
            ids["invA1"],
            {
                "resourceType": "Invoice",
                "status": "issued",
                "subject": _ref("Patient", ids["p1"]),
                "recipient": _ref("Organization", ids["orgA"]),
            },
        ),
    ]
    # Chat is written by its participants: a system client (like an admin) cannot reach it.
    chat = [r for r in resources if r[1] in (ids["chatA1"], ids["binChat"])]
    # The world is set up as server work (like the workflow's own writes): case Tasks in any
    # status, owners assigned, without going through the case operations.
    _store(app, [r for r in resources if r not in chat])

    scopes = "user/*.cruds openid fhirUser"
    tokens = {
        "reqA": _token(
            app, f"reqa-{u}", "requester", scopes,
            practitioner_role=role_a, organization=ids["orgA"],
        ),
        "reqB": _token(
            app, f"reqb-{u}", "requester", scopes, practitioner_role=role_b, organization=org_b
        ),
        "prov1": _token(app, f"prov1-{u}", "provider", scopes, practitioner_role=role_p1),
        "prov2": _token(app, f"prov2-{u}", "provider", scopes, practitioner_role=role_p2),
        "admin": _token(app, f"admin-{u}", "admin", scopes),
        "patP1": _token(app, f"pat-{u}", "patient", "patient/*.cruds", patient=ids["p1"]),
    }  # fmt: skip
    clients = {
        role: TestClient(
            app, base_url="http://testserver", headers={"Authorization": f"Bearer {tok}"}
        )
        for role, tok in tokens.items()
    }
    assert client.post("/fhir", json=_transaction(chat)).status_code == 403
    response = clients["reqA"].post("/fhir", json=_transaction(chat))
    assert response.status_code == 200, response.text
    # p3: created by requester A itself, in no case
    created = clients["reqA"].put(
        f"/fhir/Patient/{ids['p3']}",
        json={"resourceType": "Patient", "id": ids["p3"], "name": [{"family": f"p3{secret}"}]},
    )
    assert created.status_code == 201, created.text
    return World(ids, clients, secret)


def _store(app: Any, resources: list[tuple[str, str, dict[str, Any]]]) -> None:
    def work(tx: Any) -> None:
        for rtype, rid, body in resources:
            tx.update(rtype, rid, {**body, "id": rid})

    app.state.repo.write(work)


def _transaction(resources: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    entries = [
        {"resource": {**body, "id": rid}, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}
        for rtype, rid, body in resources
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.fixture(scope="module")
def world(app, client) -> World:
    return _build(app, client)


CASES = [(role, key) for role in ROLES for key in EXPECTED]


def _ids(bundle: dict[str, Any], mode: str | None = None) -> set[str]:
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", ())
        if "resource" in e and (mode is None or e.get("search", {}).get("mode") == mode)
    }


@pytest.mark.parametrize(("role", "key"), CASES)
def test_read_paths(world: World, role: str, key: str) -> None:
    """read, vread, instance history and search by id agree with EXPECTED."""
    http = world.clients[role]
    ref = world.ref(key)
    allowed = role in EXPECTED[key]
    read = http.get(f"/fhir/{ref}")
    assert read.status_code == (200 if allowed else 404), (role, key, read.text)
    if not allowed:
        assert world.secret not in read.text
    vread = http.get(f"/fhir/{ref}/_history/1")
    assert vread.status_code == (200 if allowed else 404)
    history = http.get(f"/fhir/{ref}/_history")
    assert history.status_code == (200 if allowed else 404)
    rtype = TYPES[key]
    found = http.get(f"/fhir/{rtype}", params={"_id": world.ids[key], "_total": "accurate"})
    assert found.status_code == 200
    assert (ref in _ids(found.json())) == allowed
    assert found.json()["total"] == (1 if allowed else 0)


@pytest.mark.parametrize("role", ROLES)
def test_type_and_system_history_and_search_never_leak(world: World, role: str) -> None:
    http = world.clients[role]
    mine = {world.ref(k) for k, roles in EXPECTED.items() if role in roles}
    others = {world.ref(k) for k in EXPECTED} - mine
    seen: set[str] = set()
    for rtype in sorted(set(TYPES.values())):
        listing = http.get(f"/fhir/{rtype}/_history", params={"_count": 1000})
        assert listing.status_code == 200
        seen |= _ids(listing.json())
        search = http.get(f"/fhir/{rtype}", params={"_count": 1000})
        seen |= _ids(search.json())
    system = http.get("/fhir/_history", params={"_count": 1000})
    seen |= _ids(system.json())
    assert not (seen & others), seen & others
    assert mine <= seen


@pytest.mark.parametrize("role", ROLES)
def test_includes_never_leak(world: World, role: str) -> None:
    http = world.clients[role]
    patients = ",".join(world.ids[k] for k in ("p1", "p2", "p3"))
    allowed = {world.ref(k) for k, roles in EXPECTED.items() if role in roles}
    everything = {world.ref(k) for k in EXPECTED}
    for query in (
        {"_id": patients, "_revinclude": "*"},
        {"_id": patients, "_revinclude:iterate": "*", "_revinclude": "*"},
    ):
        bundle = http.get("/fhir/Patient", params=query).json()
        got = _ids(bundle) & everything
        assert got <= allowed, (role, got - allowed)
    obs = http.get("/fhir/Observation", params={"_id": world.ids["obsP2"], "_include": "*"}).json()
    assert (_ids(obs) & everything) <= allowed


@pytest.mark.parametrize("role", ROLES)
def test_chains_and_has_never_reveal_hidden_resources(world: World, role: str) -> None:
    http = world.clients[role]
    # obsP2 is derived from docB1: matching on docB1's description reveals docB1 exists.
    chained = http.get(
        "/fhir/Observation",
        params={"derived-from:DocumentReference.description": f"docB1{world.secret}"},
    ).json()
    visible = role in EXPECTED["obsP2"] and role in EXPECTED["docB1"]
    assert (world.ref("obsP2") in _ids(chained)) == visible
    # p1 has a chat message: _has must not reveal it to who may not see the chat.
    has = http.get(
        "/fhir/Patient",
        params={"_id": world.ids["p1"], "_has:Communication:subject:status": "completed"},
    ).json()
    assert (world.ref("p1") in _ids(has)) == (role in EXPECTED["p1"] and role in EXPECTED["chatA1"])


@pytest.mark.parametrize("role", ROLES)
def test_everything_and_transactions_never_leak(world: World, role: str) -> None:
    http = world.clients[role]
    allowed = {world.ref(k) for k, roles in EXPECTED.items() if role in roles}
    everything = {world.ref(k) for k in EXPECTED}
    result = http.get(f"/fhir/Patient/{world.ids['p1']}/$everything")
    if role in EXPECTED["p1"]:
        assert result.status_code == 200
        assert (_ids(result.json()) & everything) <= allowed
    else:
        assert result.status_code == 404
    for kind in ("batch", "transaction"):
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [{"request": {"method": "GET", "url": world.ref(k)}} for k in EXPECTED],
        }
        response = http.post("/fhir", json=bundle)
        if kind == "batch":
            statuses = [e["response"]["status"] for e in response.json()["entry"]]
            for key, status in zip(EXPECTED, statuses, strict=True):
                assert status.startswith("200" if role in EXPECTED[key] else "404"), (key, status)
        else:
            hidden = any(role not in roles for roles in EXPECTED.values())
            assert response.status_code == (404 if hidden else 200)
            assert world.secret not in response.text or not hidden


@pytest.mark.parametrize("role", ROLES)
def test_writes_stay_within_reach(world: World, role: str) -> None:
    http = world.clients[role]
    # Updating what one cannot see is refused and changes nothing.
    for key in ("caseB1", "chatA1", "caseA1"):
        if role in EXPECTED[key]:
            continue
        current = world.clients["reqB" if key == "caseB1" else "reqA"].get(
            f"/fhir/{world.ref(key)}"
        )
        response = http.put(f"/fhir/{world.ref(key)}", json=current.json())
        assert response.status_code in (403, 404), (role, key, response.status_code)
        assert http.delete(f"/fhir/{world.ref(key)}").status_code in (403, 404)
    after = world.clients["reqA"].get(f"/fhir/{world.ref('caseA1')}").json()
    assert after["meta"]["versionId"] == "1"


def test_requester_cannot_file_a_case_for_another_organization(world: World) -> None:
    body = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{world.ids['p2']}"},
        "requester": world.clients["reqB"].get(f"/fhir/{world.ref('caseB1')}").json()["requester"],
    }
    response = world.clients["reqA"].post("/fhir/ServiceRequest", json=body)
    assert response.status_code == 403
    assert response.json()["resourceType"] == "OperationOutcome"


def test_audit_trail_is_admin_only_and_append_only(world: World, app) -> None:
    app.state.audit.flush()
    assert world.clients["reqA"].get("/fhir/AuditEvent").status_code == 403
    events = world.clients["admin"].get("/fhir/AuditEvent", params={"_count": 5})
    assert events.status_code == 200
    entry = events.json()["entry"][0]["resource"]
    assert entry["resourceType"] == "AuditEvent"
    admin = world.clients["admin"]
    assert admin.put(f"/fhir/AuditEvent/{entry['id']}", json=entry).status_code == 405
    assert admin.delete(f"/fhir/AuditEvent/{entry['id']}").status_code == 405
    # chat content never reaches the audit trail
    everything = admin.get("/fhir/AuditEvent", params={"_count": 1000}).text
    assert f"chat {world.secret}" not in everything


def test_writes_get_provenance(world: World) -> None:
    prov = world.clients["admin"].get(
        "/fhir/Provenance", params={"target": f"Patient/{world.ids['p3']}"}
    )
    assert prov.status_code == 200
    bodies = [e["resource"] for e in prov.json().get("entry", ())]
    assert bodies and bodies[0]["activity"]["coding"][0]["code"] == "CREATE"
    assert bodies[0]["target"][0]["reference"].startswith(f"Patient/{world.ids['p3']}/_history/")


def test_scopes_narrow_what_a_token_reaches(app, world: World) -> None:
    u = uuid.uuid4().hex[:8]
    obs_only = _token(app, f"o-{u}", "admin", "user/Observation.rs")
    http = TestClient(app, headers={"Authorization": f"Bearer {obs_only}"})
    assert http.get(f"/fhir/{world.ref('obsP2')}").status_code == 200
    assert http.get(f"/fhir/{world.ref('p1')}").status_code == 403
    assert http.get("/fhir/Patient").status_code == 403
    assert http.post("/fhir/Observation", json={"resourceType": "Observation"}).status_code == 403
    # _include of a type the token may not read brings nothing back
    included = http.get(
        "/fhir/Observation", params={"_id": world.ids["obsP2"], "_include": "Observation:subject"}
    ).json()
    assert _ids(included) == {world.ref("obsP2")}
    # v2 restriction: only Observations matching the query
    lab = _token(app, f"l-{u}", "admin", "user/Observation.rs?status=preliminary")
    http = TestClient(app, headers={"Authorization": f"Bearer {lab}"})
    assert http.get(f"/fhir/{world.ref('obsP2')}").status_code == 404
    # patient/ scopes: only the launch patient's compartment
    ctx = _token(app, f"c-{u}", "admin", "patient/*.rs", patient=world.ids["p1"])
    http = TestClient(app, headers={"Authorization": f"Bearer {ctx}"})
    assert http.get(f"/fhir/{world.ref('p1')}").status_code == 200
    assert http.get(f"/fhir/{world.ref('p2')}").status_code == 404
    # v1 read scope: no writes
    v1 = _token(app, f"v-{u}", "admin", "user/*.read")
    http = TestClient(app, headers={"Authorization": f"Bearer {v1}"})
    assert http.get(f"/fhir/{world.ref('p1')}").status_code == 200
    response = http.put(
        f"/fhir/{world.ref('p1')}", json=http.get(f"/fhir/{world.ref('p1')}").json()
    )
    assert response.status_code == 403


def test_requests_without_a_valid_token_are_401(app) -> None:
    http = TestClient(app)
    assert http.get("/fhir/metadata").status_code == 200
    missing = http.get("/fhir/Patient")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["resourceType"] == "OperationOutcome"
    bad = http.get("/fhir/Patient", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]


def test_reassignment_moves_the_case_between_providers(app, client, world: World) -> None:
    """A provider loses a case when an admin gives it to another provider."""
    task_ref = world.ref("taskB1")
    case_ref = world.ref("caseB1")
    task = client.get(f"/fhir/{task_ref}").json()
    prov1_role = world.clients["prov1"].get(f"/fhir/{world.ref('taskA1')}").json()["owner"]
    assert world.clients["prov1"].get(f"/fhir/{case_ref}").status_code == 404
    rid = world.ids["taskB1"]
    _store(app, [("Task", rid, {**task, "owner": prov1_role})])
    try:
        assert world.clients["prov1"].get(f"/fhir/{case_ref}").status_code == 200
        assert world.clients["prov2"].get(f"/fhir/{case_ref}").status_code == 404
        assert world.clients["prov2"].get(f"/fhir/{world.ref('docB1')}").status_code == 404
    finally:
        _store(app, [("Task", rid, task)])
    assert world.clients["prov2"].get(f"/fhir/{case_ref}").status_code == 200


def test_only_the_server_writes_notifications(world: World) -> None:
    fake = {
        "resourceType": "Communication",
        "status": "completed",
        "category": [
            {
                "coding": [
                    {
                        "system": "https://mso.example.org/fhir/CodeSystem/communication-category",
                        "code": "notification",
                    }
                ]
            }
        ],
        "recipient": [{"reference": world.ref("p1")}],
        "payload": [{"contentString": "Case assigned to you"}],
    }
    response = world.clients["reqA"].post("/fhir/Communication", json=fake)
    assert response.status_code == 403
    mine = world.clients["reqA"].get(f"/fhir/{world.ref('noteA')}").json()
    assert world.clients["reqA"].put(f"/fhir/{world.ref('noteA')}", json=mine).status_code == 403


def test_billing_is_written_by_administrators_only(world: World) -> None:
    invoice = world.clients["reqA"].get(f"/fhir/{world.ref('invA1')}").json()
    paid = {**invoice, "status": "balanced"}
    assert world.clients["reqA"].put(f"/fhir/{world.ref('invA1')}", json=paid).status_code == 403
    fresh = {k: v for k, v in invoice.items() if k not in ("id", "meta")}
    assert world.clients["reqA"].post("/fhir/Invoice", json=fresh).status_code == 403
    assert world.clients["reqA"].delete(f"/fhir/{world.ref('invA1')}").status_code == 403
    assert world.clients["admin"].get(f"/fhir/{world.ref('invA1')}").json()["status"] == "issued"


def test_only_the_case_task_assigns_a_case(app, world: World) -> None:
    """Another Task focused on the case (not code ``case``) cannot hand it to a provider."""
    prov1_role = world.clients["prov1"].get(f"/fhir/{world.ref('taskA1')}").json()["owner"]
    rogue = {
        "resourceType": "Task",
        "status": "accepted",
        "intent": "order",
        "focus": {"reference": world.ref("caseB1")},
        "owner": prov1_role,
    }
    _store(app, [("Task", f"rogue-{world.ids['caseB1']}", rogue)])
    assert world.clients["prov1"].get(f"/fhir/{world.ref('caseB1')}").status_code == 404
    assert world.clients["prov2"].get(f"/fhir/{world.ref('caseB1')}").status_code == 200


def test_a_large_transaction_provenance_is_seen_through_its_targets(world: World) -> None:
    """A transaction's shared Provenance gets an access row per target (more than fit in the
    write's scope statement: they go in as one batch): requester A, who wrote the Patients,
    sees it; requester B, who sees none of them, does not."""
    u = uuid.uuid4().hex[:8]
    entries = [
        {
            "resource": {"resourceType": "Patient", "name": [{"family": f"Bulk{u}{n}"}]},
            "request": {"method": "POST", "url": "Patient"},
        }
        for n in range(12)
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = world.clients["reqA"].post("/fhir", json=bundle)
    assert response.status_code == 200, response.text
    written = [e["response"]["location"].split("/fhir/")[1] for e in response.json()["entry"]]
    target = written[-1].split("/_history")[0]
    for role, expected in (("reqA", 1), ("reqB", 0), ("admin", 1)):
        found = world.clients[role].get("/fhir/Provenance", params={"target": target})
        assert found.status_code == 200
        provenances = [e["resource"] for e in found.json().get("entry", ())]
        assert len(provenances) == expected, role
        if expected:
            assert sorted(t["reference"] for t in provenances[0]["target"]) == sorted(written)
    for ref in written:
        assert world.clients["reqB"].get(f"/fhir/{ref.split('/_history')[0]}").status_code == 404


# -- the repository-level search seam (Tx.search, Tx.iter_search) -------------------------------


def _principal(app: Any, world: World, role: str) -> Any:
    token = world.clients[role].headers["Authorization"].split()[1]
    return app.state.tokens.verify(token).principal


def _refs(resources: Any) -> list[str]:
    return [s.reference for s in resources]


@pytest.mark.parametrize("role", ROLES)
def test_the_repository_search_applies_the_callers_access(app, world: World, role: str) -> None:
    """Tx.search and Tx.iter_search return what the caller may see, as the HTTP search does."""
    principal = _principal(app, world, role)
    mine = {world.ref(k) for k, roles in EXPECTED.items() if role in roles}
    others = {world.ref(k) for k in EXPECTED} - mine
    paged: set[str] = set()
    streamed: list[str] = []
    with app.state.repo.unit(caller=principal, snapshot=False) as tx:
        for rtype in sorted(set(TYPES.values())):
            page = tx.search(rtype, [("_count", "1000")])
            assert page.next_cursor is None
            paged |= set(_refs(page.matches))
            streamed.extend(_refs(tx.iter_search(rtype, batch=2)))
    assert not (paged & others), paged & others
    assert mine <= paged
    assert len(streamed) == len(set(streamed))  # no resource twice across batches
    assert set(streamed) == paged


def test_the_seam_bounds_batches_by_bytes_and_reads_a_large_resource_in_slices(
    app, world: World
) -> None:
    """``max_bytes`` changes how contents are read, never what: resources larger than it are
    read alone, in slices of that many bytes (bulk export of large inline attachments), and
    come out byte for byte as a plain load gives them."""
    principal = _principal(app, world, "reqA")
    with app.state.repo.unit(caller=principal, snapshot=False) as tx:
        for rtype in sorted(set(TYPES.values())):
            whole = {s.pid: s.content for s in tx.iter_search(rtype, batch=3)}
            for max_bytes in (7, 100_000):
                sliced = list(tx.iter_search(rtype, batch=3, max_bytes=max_bytes))
                assert [s.pid for s in sliced] == list(whole)
                assert {s.pid: s.content for s in sliced} == whole


def test_a_requester_sees_only_its_organizations_cases_through_the_seam(app, world: World) -> None:
    u = world.ids["caseA1"].split("-")[-1]  # this world's suffix: other tests' cases aside
    for role, expected in (("reqA", {"caseA1", "caseA2"}), ("reqB", {"caseB1"})):
        principal = _principal(app, world, role)
        with app.state.repo.unit(caller=principal, snapshot=False) as tx:
            page = tx.search("ServiceRequest", [("_count", "1000")])
            streamed = list(tx.iter_search("ServiceRequest", batch=1))
        found = {k for s in page.matches if (k := world.key_of(s.res_type, s.res_id))}
        assert found == expected
        assert {s.res_id for s in streamed if s.res_id.endswith(u)} == {
            world.ids[k] for k in expected
        }
        pids = [s.pid for s in streamed]
        assert pids == sorted(pids)  # pid order


def test_the_seam_pages_by_cursor_and_includes_within_reach(app, world: World) -> None:
    principal = _principal(app, world, "reqA")
    with app.state.repo.unit(caller=principal, snapshot=False) as tx:
        whole = _refs(tx.search("Task", [("_count", "1000")]).matches)
        walked: list[str] = []
        page = tx.search("Task", [("_total", "accurate")], count=1)
        total = page.total
        while True:
            walked.extend(_refs(page.matches))
            if page.next_cursor is None:
                break
            page = tx.search("Task", [], count=1, cursor=page.next_cursor)
        included = tx.search(
            "Task", [("_id", world.ids["taskA1"]), ("_include", "Task:focus")]
        ).included
    assert walked == whole and total == len(whole)
    assert _refs(included) == [world.ref("caseA1")]


def test_the_seam_checks_the_type_the_permission_and_strict_parameters(app, world: World) -> None:
    from fhir_server.auth.principal import Principal
    from fhir_server.auth.scopes import ScopeSet
    from fhir_server.fhir.outcome import FhirError

    principal = _principal(app, world, "reqA")
    observations_only = Principal(
        subject=principal.subject,
        role=principal.role,
        scopes=ScopeSet.parse("user/Observation.rs"),
        client_id="matrix",
        fhir_user=principal.fhir_user,
        practitioner_role=principal.practitioner_role,
        organization=principal.organization,
    )
    repo = app.state.repo
    with repo.unit(caller=principal, snapshot=False) as tx:
        with pytest.raises(FhirError) as unknown:
            tx.search("NoSuchType", [])
        assert unknown.value.code == "MSO-SEARCH-004"
        with pytest.raises(FhirError) as strict:
            tx.search("Patient", [("no-such-param", "x")], strict=True)
        assert strict.value.status == 400
        with pytest.raises(FhirError) as streamed:
            list(tx.iter_search("Patient", [("no-such-param", "x")]))
        assert streamed.value.status == 400
        lenient = tx.search("Patient", [("no-such-param", "x"), ("_id", world.ids["p3"])])
        assert [i.name for i in lenient.query.issues] == ["no-such-param"]
        assert _refs(lenient.matches) == [world.ref("p3")]
    with repo.unit(caller=observations_only, snapshot=False) as tx:
        with pytest.raises(FhirError) as denied:
            tx.search("Patient", [])
        assert denied.value.status == 403
        # without the check (a search inside another interaction) the filter still applies
        assert tx.search("Patient", [], check=False).matches == []
