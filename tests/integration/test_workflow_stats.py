"""``GET /$mso-stats`` against hand-counted cases driven through the real workflow, on SQLite and
PostgreSQL (issue 5, Analytics).

**Setting times.** The workflow stamps ``Task.authoredOn`` (submission), the SLA due instant and
``Task.lastModified`` (each transition) from ``fhir_server.workflow.service.utc_now``; the
fixture replaces that clock with :class:`Clock` and sets it before each request, so every
submission and transition happens at a known instant in May 2003. The figures are then asked
for the window ``start=2003-05-01&end=2003-05-01``, which holds exactly these cases (every other
test of the session works at the real time). The expected Parameters is written out in full
and is the same for both databases.

The cases (hours after 2003-05-01T00:00Z; routine SLA 72 h, stat 4 h):

==== ======== ========= ======== ================================================ ==========
case org      specialty priority moves                                            status
==== ======== ========= ======== ================================================ ==========
A    A        oncology  routine  assign p1 @1, accept @2, start @3, complete @10  Done 10 h
B    A        oncology  routine  assign p1 @1, reject @2, assign p2 @3, accept @4, Done 30 h
                                 start @5, complete @30
C    B        surgery   stat     assign p2 @1, accept @1.5, start @2, complete @6 Done 6 h
                                                                                  (late)
H    B        oncology  routine  assign p1, accept, start, return @4, answer @5,  Done 20.5 h
                                 start @6, complete @20.5
D    B        oncology  routine  assign p1 @1, accept @2                          Accepted
I    A        oncology  routine  assign p1, accept, start, return @4              Returned
J    A        surgery   routine  assign p2 @1, accept @2, start @3                In progress
K    A        oncology  routine  assign p2 @1                                     Assigned
E    A        surgery   routine  —                                                New
F    A        oncology  routine  cancel @1                                        Cancelled
G    A        oncology  stat     assign p2 @1, reject @2                          Rejected
Z    A        oncology  routine  submitted 2003-04-29 (outside the window)        New
==== ======== ========= ======== ================================================ ==========

Turnarounds 6, 10, 20.5, 30 h: median 15.25 h, p90 = 20.5 + 0.7 x 9.5 = 27.15 h.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhir_server.codes import (
    CASE_STATUS_SYSTEM,
    REPORT_TYPE_RECOMMENDATION,
    REPORT_TYPE_SYSTEM,
    SPECIALTY_SYSTEM,
    CaseStatus,
)
from fhir_server.workflow import service as workflow_service
from fhir_server.workflow import stats
from tests.auth_helpers import token_for
from tests.integration.workflow_world import World, build_world

T0 = datetime(2003, 5, 1, tzinfo=UTC)
WINDOW = {"start": "2003-05-01", "end": "2003-05-01"}


@dataclass
class Clock:
    """The workflow's clock in these tests: hours after :data:`T0`."""

    now: datetime = T0

    def at(self, hours: float) -> None:
        self.now = T0 + timedelta(hours=hours)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Fixture:
    """The world, its second requesting organization and the cases by letter."""

    world: World
    org_b: str
    role_b: str
    cases: dict[str, tuple[str, str]] = field(default_factory=dict)


def _second_requester(world: World) -> tuple[str, str]:
    """A requester in another organization (``reqB``); its organization and role ids."""
    org, role = f"orgB-{world.u}", f"rqB-{world.u}"
    for path, body in (
        (f"Organization/{org}", {"resourceType": "Organization", "id": org, "name": "B"}),
        (
            f"PractitionerRole/{role}",
            {
                "resourceType": "PractitionerRole",
                "id": role,
                "active": True,
                "organization": {"reference": f"Organization/{org}"},
            },
        ),
    ):
        assert world.client.put(f"/fhir/{path}", json=body).status_code in (200, 201)
    token = token_for(world.app, role="requester", organization=org, practitioner_role=role)
    world.headers["reqB"] = {"Authorization": f"Bearer {token}"}
    return org, role


def _submit(
    world: World, who: str, specialty: str, priority: str, role: str | None = None
) -> tuple[str, str]:
    """Submit a case of ``specialty`` as ``who`` (acting as ``role``); (ServiceRequest id, case
    Task id)."""
    bundle = world.submission(priority=priority)
    request = bundle["entry"][0]["resource"]
    request["code"] = {"coding": [{"system": SPECIALTY_SYSTEM, "code": specialty}]}
    if role is not None:
        request["requester"] = {"reference": f"PractitionerRole/{role}"}
    response = world.post(who, "", bundle)
    assert response.status_code == 200, response.text
    sr_id = next(
        e["response"]["location"].split("ServiceRequest/")[1].split("/")[0]
        for e in response.json()["entry"]
        if "ServiceRequest/" in e["response"]["location"]
    )
    found = world.get(who, "Task", params={"focus": f"ServiceRequest/{sr_id}", "code": "case"})
    return sr_id, found.json()["entry"][0]["resource"]["id"]


def _complete(world: World, who: str, role: str, sr_id: str, task_id: str) -> None:
    """``who`` (the provider ``role``) drafts the recommendation and completes the case."""
    report = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "code": {"coding": [{"system": REPORT_TYPE_SYSTEM, "code": REPORT_TYPE_RECOMMENDATION}]},
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "subject": {"reference": f"Patient/{world.patient}"},
        "performer": [{"reference": f"PractitionerRole/{role}"}],
        "conclusion": "Watchful waiting.",
    }
    assert world.post(who, "DiagnosticReport", report).status_code == 201
    _move(world, who, task_id, "complete")


def _move(world: World, who: str, task_id: str, name: str, **params: Any) -> None:
    response = world.op(who, task_id, name, **params)
    assert response.status_code == 200, response.text


SCRIPT: dict[str, tuple[str, str, str, str]] = {
    # letter: (requester, specialty, priority, "hour who operation [argument] | …")
    "A": (
        "reqA",
        "oncology",
        "routine",
        "1 admin assign prov1 | 2 prov1 accept | 3 prov1 start | 10 prov1 complete",
    ),
    "B": (
        "reqA",
        "oncology",
        "routine",
        "1 admin assign prov1 | 2 prov1 reject busy"
        " | 3 admin assign prov2 | 4 prov2 accept | 5 prov2 start | 30 prov2 complete",
    ),
    "C": (
        "reqB",
        "surgery",
        "stat",
        "1 admin assign prov2 | 1.5 prov2 accept | 2 prov2 start | 6 prov2 complete",
    ),
    "H": (
        "reqB",
        "oncology",
        "routine",
        "1 admin assign prov1 | 2 prov1 accept | 3 prov1 start"
        " | 4 prov1 return labs? | 5 reqB answer attached | 6 prov1 start"
        " | 20.5 prov1 complete",
    ),
    "D": ("reqB", "oncology", "routine", "1 admin assign prov1 | 2 prov1 accept"),
    "I": (
        "reqA",
        "oncology",
        "routine",
        "1 admin assign prov1 | 2 prov1 accept | 3 prov1 start | 4 prov1 return labs?",
    ),
    "J": ("reqA", "surgery", "routine", "1 admin assign prov2 | 2 prov2 accept | 3 prov2 start"),
    "K": ("reqA", "oncology", "routine", "1 admin assign prov2"),
    "E": ("reqA", "surgery", "routine", ""),
    "F": ("reqA", "oncology", "routine", "1 reqA cancel"),
    "G": ("reqA", "oncology", "stat", "1 admin assign prov2 | 2 prov2 reject full"),
}
"""The cases of the module docstring's table."""
ARGUMENT = {"assign": "provider", "reject": "reason", "return": "reason", "answer": "answer"}


def _run(fixture: Fixture, clock: Clock) -> None:
    world = fixture.world
    roles = {"prov1": world.prov1, "prov2": world.prov2}
    for letter, (who, specialty, priority, script) in SCRIPT.items():
        clock.at(0)
        role = fixture.role_b if who == "reqB" else None
        sr_id, task_id = _submit(world, who, specialty, priority, role)
        fixture.cases[letter] = (sr_id, task_id)
        for step in filter(None, (s.split() for s in script.split("|"))):
            hour, actor, name, *argument = step
            clock.at(float(hour))
            params = {ARGUMENT[name]: argument[0]} if argument else {}
            if name == "complete":
                _complete(world, actor, roles[actor], sr_id, task_id)
            elif name == "answer":
                issues = world.get(actor, "Task", params={"part-of": f"Task/{task_id}"})
                issue_id = issues.json()["entry"][0]["resource"]["id"]
                _move(world, actor, issue_id, name, **params)
            elif name == "assign":
                provider = f"PractitionerRole/{roles[params['provider']]}"
                _move(world, actor, task_id, name, provider=provider)
            else:
                _move(world, actor, task_id, name, **params)
    clock.at(-48)
    fixture.cases["Z"] = _submit(world, "reqA", "oncology", "routine")


@pytest.fixture(scope="module")
def fixture(app: Any, client: Any) -> Iterator[Fixture]:
    """The hand-counted cases, built once per database with the workflow clock set."""
    world = build_world(app, client)
    built = Fixture(world, *_second_requester(world))
    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workflow_service, "utc_now", clock)
        _run(built, clock)
    yield built


def _expected(fixture: Fixture, *, open_breaches: int) -> dict[str, Any]:
    world = fixture.world
    counts = {
        CaseStatus.NEW: 1,
        CaseStatus.ASSIGNED: 1,
        CaseStatus.ACCEPTED: 1,
        CaseStatus.REJECTED: 1,
        CaseStatus.IN_PROGRESS: 1,
        CaseStatus.RETURNED: 1,
        CaseStatus.DONE: 4,
        CaseStatus.CANCELLED: 1,
    }

    def part(name: str, **value: Any) -> dict[str, Any]:
        return {"name": name, **value}

    def provider(role: str, open_cases: int, accepted: int, rejected: int, rate: float) -> dict:
        return {
            "name": "provider",
            "part": [
                part("role", valueReference={"reference": f"PractitionerRole/{role}"}),
                part("openCases", valueInteger=open_cases),
                part("accepted", valueInteger=accepted),
                part("rejected", valueInteger=rejected),
                part("acceptanceRate", valueDecimal=rate),
            ],
        }

    orgs = sorted([(world.org, 8), (fixture.org_b, 3)])
    providers = sorted(
        [provider(world.prov1, 2, 4, 1, 0.8), provider(world.prov2, 2, 3, 1, 0.75)],
        key=lambda p: p["part"][0]["valueReference"]["reference"],
    )
    return {
        "resourceType": "Parameters",
        "parameter": [
            part("start", valueString=WINDOW["start"]),
            part("end", valueString=WINDOW["end"]),
            part("total", valueInteger=11),
            *(
                {
                    "name": "status",
                    "part": [
                        part("code", valueCoding={"system": CASE_STATUS_SYSTEM, "code": s.value}),
                        part("count", valueInteger=counts[s]),
                    ],
                }
                for s in CaseStatus
            ),
            *(
                {
                    "name": "specialty",
                    "part": [
                        part("code", valueCoding={"system": SPECIALTY_SYSTEM, "code": code}),
                        part("count", valueInteger=n),
                    ],
                }
                for code, n in (("oncology", 8), ("surgery", 3))
            ),
            *(
                {
                    "name": "requester",
                    "part": [
                        part("organization", valueReference={"reference": f"Organization/{o}"}),
                        part("count", valueInteger=n),
                    ],
                }
                for o, n in orgs
            ),
            {
                "name": "turnaround",
                "part": [
                    part("count", valueInteger=4),
                    part("medianHours", valueDecimal=15.25),
                    part("p90Hours", valueDecimal=27.15),
                ],
            },
            {
                "name": "slaBreaches",
                "part": [
                    part("total", valueInteger=1 + open_breaches),
                    part("done", valueInteger=1),
                    part("open", valueInteger=open_breaches),
                ],
            },
            *providers,
        ],
    }


def test_stats_match_the_hand_counted_cases(fixture: Fixture) -> None:
    """Every figure, over HTTP: all six open cases are past their 2003 due dates by now."""
    response = fixture.world.get("admin", "$mso-stats", params=WINDOW)
    assert response.status_code == 200, response.text
    assert response.json() == _expected(fixture, open_breaches=6)


def test_open_breaches_are_counted_at_now(app: Any, fixture: Fixture) -> None:
    """Five hours after submission only the stat case G (due after 4 h, Rejected) is late."""
    repo = app.state.repo
    window = (int(T0.timestamp() * 1000), int((T0 + timedelta(days=1)).timestamp() * 1000) - 1)
    now_ms = int((T0 + timedelta(hours=5)).timestamp() * 1000)
    figures = repo.read_only(
        lambda tx: stats.case_stats(
            tx.conn, repo.registry, start_ms=window[0], end_ms=window[1], now_ms=now_ms
        )
    )
    expected = _expected(fixture, open_breaches=1)
    assert stats.as_parameters(figures, **WINDOW) == expected


def test_the_window_selects_by_submission(fixture: Fixture) -> None:
    """Z (submitted two days earlier) is in April's window, the others are not."""
    april = fixture.world.get("admin", "$mso-stats", params={"start": "2003-04", "end": "2003-04"})
    assert april.status_code == 200, april.text
    figures = {p["name"]: p for p in april.json()["parameter"]}
    assert figures["total"]["valueInteger"] == 1
    both = fixture.world.get(
        "admin", "$mso-stats", params={"start": "2003-04-29", "end": "2003-05"}
    )
    assert {p["name"]: p for p in both.json()["parameter"]}["total"]["valueInteger"] == 12
    everything = fixture.world.get("admin", "$mso-stats")
    assert {p["name"]: p for p in everything.json()["parameter"]}["total"]["valueInteger"] >= 12


def test_bad_dates_are_400(fixture: Fixture) -> None:
    for params in ({"start": "yesterday"}, {"start": "2003-05-02", "end": "2003-05-01"}):
        response = fixture.world.get("admin", "$mso-stats", params=params)
        assert response.status_code == 400, response.text
        assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "MSO-STATS-400"


def test_only_admins_and_system_clients(fixture: Fixture, app: Any) -> None:
    world = fixture.world
    for who in ("reqA", "reqB", "prov1", "prov2", "patient"):
        response = world.get(who, "$mso-stats", params=WINDOW)
        assert response.status_code == 403, (who, response.text)
        assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "MSO-STATS-403"
    org_client = token_for(app, role="system", organization=world.org, client_id="stats-org")
    response = world.client.get(
        "/fhir/$mso-stats", params=WINDOW, headers={"Authorization": f"Bearer {org_client}"}
    )
    assert response.status_code == 403, response.text
    system = world.client.get("/fhir/$mso-stats", params=WINDOW)  # the suite's system token
    assert system.status_code == 200, system.text
    assert system.json() == world.get("admin", "$mso-stats", params=WINDOW).json()
