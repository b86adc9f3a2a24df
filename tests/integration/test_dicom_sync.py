"""The gateway's ImagingStudy sync against a real Orthanc and a live ``mso serve``.

Studies go straight into Orthanc's DICOM port with dcmtk's storescu (the change-feed path);
the sync (:func:`dicom_gateway.sync.build_sync`) runs in-process as a registered SMART backend
client whose keys the test generates, and its passes are driven by the test. Uploads and priors
go through a real gateway (SCP, spool, forwarders; its own sync off). A second Orthanc plays the
hospital PACS for ``$import-priors``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dicom_gateway.config import GatewaySettings
from dicom_gateway.gateway import Gateway
from dicom_gateway.sync import SyncService, build_sync
from fhir_server.codes import (
    CASE_CATEGORY_SECOND_OPINION,
    CASE_CATEGORY_SYSTEM,
    CASE_NUMBER_SYSTEM,
    DOCUMENT_CATEGORY_SYSTEM,
    SPECIALTY_SYSTEM,
    TASK_CODE_IMPORT_PRIORS,
    TASK_CODE_SYSTEM,
)
from fhir_server.config import Settings
from tests.auth_helpers import token_for
from tests.dicom_helpers import (
    make_series,
    register_gateway_client,
    store_succeeded,
    storescu,
    until,
)
from tests.e2e.conftest import start_server, stop_server
from tests.orthanc_process import Orthanc, require_orthanc, start_orthanc

MRN = "urn:mso:test-mrn"
GATEWAY_AET = "MSOGW"


@dataclass
class Env:
    base: str
    db_url: str
    orthanc: Orthanc
    pacs: Orthanc
    gateway: Gateway
    sync: SyncService
    settings: GatewaySettings
    tmp: Path
    u: str
    org: str
    req_role: str
    provider: str
    headers: dict[str, dict[str, str]]

    def token(self, **kw: Any) -> dict[str, str]:
        settings = Settings(database_url=self.db_url, base_url=self.base)
        return {"Authorization": f"Bearer {token_for(settings, audience=self.base, **kw)}"}

    def get(self, who: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(f"{self.base}/{path}", headers=self.headers[who], timeout=30, **kw)

    def post(self, who: str, path: str, body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(
            f"{self.base}/{path}", headers=self.headers[who], json=body, timeout=30, **kw
        )

    def put(self, who: str, path: str, body: Any) -> httpx.Response:
        return httpx.put(f"{self.base}/{path}", headers=self.headers[who], json=body, timeout=30)

    def patient(self, mrn: str) -> str:
        body = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}]}
        response = self.post("admin", "Patient", body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def case(self, patient_id: str) -> tuple[str, str]:
        """A new case of the requester for ``patient_id``: (ServiceRequest id, case number)."""
        body = {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "category": [
                {"coding": [{"system": CASE_CATEGORY_SYSTEM, "code": CASE_CATEGORY_SECOND_OPINION}]}
            ],
            "code": {"coding": [{"system": SPECIALTY_SYSTEM, "code": "oncology"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "requester": {"reference": f"PractitionerRole/{self.req_role}"},
        }
        response = self.post("req", "ServiceRequest", body)
        assert response.status_code == 201, response.text
        created = response.json()
        number = next(
            i["value"] for i in created["identifier"] if i["system"] == CASE_NUMBER_SYSTEM
        )
        return created["id"], number

    def case_task(self, case_id: str) -> str:
        found = self.get("admin", "Task", params={"focus": f"ServiceRequest/{case_id}"})
        return next(
            e["resource"]["id"]
            for e in found.json()["entry"]
            if e["resource"]["code"]["coding"][0]["code"] == "case"
        )

    def send(self, name: str, n: int = 1, **kw: Any):
        """A new series of ``n`` instances stored into the platform's Orthanc."""
        series = make_series(self.tmp / f"{name}-{uuid.uuid4().hex[:6]}", n, **kw)
        result = storescu(self.orthanc.dicom_port, series.files, called=self.orthanc.aet)
        assert store_succeeded(result, n), result.stderr[-2000:]
        return series

    def study(self, study_uid: str) -> dict[str, Any] | None:
        found = self.get(
            "admin", "ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"}
        )
        assert found.status_code == 200, found.text
        entries = found.json().get("entry") or []
        return entries[0]["resource"] if entries else None

    def synced(self, study_uid: str, timeout: float = 40) -> dict[str, Any]:
        """Poll the change feed until the study's ImagingStudy exists."""
        return until(lambda: self.study(study_uid), step=self.sync.feed.poll_once, timeout=timeout)


@pytest.fixture(scope="module")
def env(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_orthanc()
    tmp = tmp_path_factory.mktemp("dicom-sync")
    u = uuid.uuid4().hex[:8]
    (tmp / "server").mkdir()
    proc, base = start_server(db_url, tmp / "server")
    orthanc = start_orthanc(tmp / "orthanc")
    client_id = f"dicom-gateway-{u}"
    scope = GatewaySettings().scope
    key_file = register_gateway_client(db_url, tmp, client_id, scope)
    common = {
        "aet": GATEWAY_AET,
        "port": 0,
        "orthanc_url": orthanc.url,
        "spool_dir": tmp / "spool",
        "patient_id_system": MRN,
        "client_id": client_id,
        "private_key": key_file,
        "poll_interval": 0.2,
        "retry_max": 1.0,
    }
    gateway = Gateway(GatewaySettings(**common))  # SCP + spool + forwarders; no sync thread
    gateway.start()
    pacs = start_orthanc(
        tmp / "pacs", aet="PACS", modalities={"MSO": [GATEWAY_AET, "127.0.0.1", gateway.port]}
    )
    settings = GatewaySettings(
        **common, fhir_base_url=base, remote_pacs=f"PACS@127.0.0.1:{pacs.dicom_port}"
    )
    sync = build_sync(settings, gateway.spool)
    db_settings = Settings(database_url=db_url, base_url=base)
    org, req_role, provider = f"org-{u}", f"rq-{u}", f"pv-{u}"
    admin = {"Authorization": f"Bearer {token_for(db_settings, role='admin', audience=base)}"}
    specialty = [{"coding": [{"system": SPECIALTY_SYSTEM, "code": "oncology"}]}]
    for rtype, rid, body in (
        ("Organization", org, {"name": f"Hospital {u}"}),
        (
            "PractitionerRole",
            req_role,
            {"active": True, "organization": {"reference": f"Organization/{org}"}},
        ),
        ("PractitionerRole", provider, {"active": True, "specialty": specialty}),
    ):
        response = httpx.put(
            f"{base}/{rtype}/{rid}", headers=admin, json={"resourceType": rtype, "id": rid, **body}
        )
        assert response.status_code in (200, 201), response.text

    def header(**kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(db_settings, audience=base, **kw)}"}

    headers = {
        "admin": admin,
        "req": header(role="requester", organization=org, practitioner_role=req_role),
        "prov": header(role="provider", practitioner_role=provider),
    }
    env = Env(
        base,
        db_url,
        orthanc,
        pacs,
        gateway,
        sync,
        settings,
        tmp,
        u,
        org,
        req_role,
        provider,
        headers,
    )
    try:
        yield env
    finally:
        sync.stop()
        gateway.stop()
        pacs.stop()
        orthanc.stop()
        stop_server(proc)


# -- the change feed ---------------------------------------------------------------------------


def test_study_synced_linked_to_patient_and_case_and_idempotent(env: Env) -> None:
    patient = env.patient(f"P1-{env.u}")
    case_id, number = env.case(patient)
    first = env.send("s1", 2, patient_id=f"P1-{env.u}", accession=number, modality="CT")
    env.send(
        "s2",
        1,
        patient_id=f"P1-{env.u}",
        accession=number,
        modality="MR",
        study_uid=first.study_uid,
    )
    study = until(
        lambda: (s := env.study(first.study_uid)) and s["numberOfInstances"] == 3 and s,
        step=env.sync.feed.poll_once,
        timeout=40,
    )
    assert study["subject"] == {"reference": f"Patient/{patient}"}
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{case_id}"}]
    assert study["numberOfSeries"] == 2
    assert {m["code"] for m in study["modality"]} == {"CT", "MR"}
    assert {s["uid"] for s in study["series"]} >= {first.series_uid}
    assert next(i for i in study["identifier"] if "type" in i)["value"] == number
    endpoint_id = study["endpoint"][0]["reference"].split("/")[1]
    endpoint = env.get("admin", f"Endpoint/{endpoint_id}").json()
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == f"{env.base.rsplit('/fhir', 1)[0]}/dicomweb"
    assert endpoint["status"] == "active"
    request = env.get("admin", f"ServiceRequest/{case_id}").json()
    assert {"reference": f"ImagingStudy/{study['id']}"} in request["supportingInfo"]
    # the case's requester sees it (the server's access rules: its patient and case)
    assert env.get("req", f"ImagingStudy/{study['id']}").status_code == 200

    # a re-sync from the start of the feed writes nothing new
    cursor = env.sync.feed.cursor.value
    env.sync.feed.cursor.advance(0)
    env.sync.feed.poll_once()
    assert env.sync.feed.cursor.value >= cursor
    again = env.study(first.study_uid)
    assert again["id"] == study["id"]
    assert again["meta"]["versionId"] == study["meta"]["versionId"]
    request_again = env.get("admin", f"ServiceRequest/{case_id}").json()
    assert request_again["meta"]["versionId"] == request["meta"]["versionId"]


def test_unknown_patient_waits_until_the_patient_exists(env: Env) -> None:
    mrn = f"P2-{env.u}"
    series = env.send("unknown", 1, patient_id=mrn)
    until(
        lambda: any(s for s in env.sync.feed.pending.data),
        step=env.sync.feed.poll_once,
        timeout=40,
    )
    assert env.study(series.study_uid) is None
    patient = env.patient(mrn)
    env.sync.feed.retry_pending_now()
    study = env.study(series.study_uid)
    assert study is not None and study["subject"]["reference"] == f"Patient/{patient}"
    assert "basedOn" not in study
    assert not env.sync.feed.pending.data


def test_accession_that_is_no_case_number(env: Env) -> None:
    patient = env.patient(f"P3-{env.u}")
    series = env.send("noacc", 1, patient_id=f"P3-{env.u}", accession=f"ACC-{env.u}")
    study = env.synced(series.study_uid)
    assert study["subject"]["reference"] == f"Patient/{patient}"
    assert "basedOn" not in study


def test_explicit_link_gives_case_and_subject(env: Env) -> None:
    patient = env.patient(f"P4-{env.u}")
    case_id, _ = env.case(patient)
    series = make_series(env.tmp / "linked", 1, patient_id="SOMEONE-ELSE-AT-THE-HOSPITAL")
    env.sync.feed.studies.links.add(series.study_uid, case_id)
    assert store_succeeded(
        storescu(env.orthanc.dicom_port, series.files, called=env.orthanc.aet), 1
    )
    study = env.synced(series.study_uid)
    assert study["subject"] == {"reference": f"Patient/{patient}"}  # the case's
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{case_id}"}]


def test_closed_case_keeps_the_link_by_based_on_only(env: Env) -> None:
    patient = env.patient(f"P5-{env.u}")
    case_id, number = env.case(patient)
    cancel = env.post(
        "req",
        f"Task/{env.case_task(case_id)}/$cancel",
        {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "dup"}]},
    )
    assert cancel.status_code == 200, cancel.text
    series = env.send("closed", 1, patient_id=f"P5-{env.u}", accession=number)
    study = env.synced(series.study_uid)
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{case_id}"}]
    request = env.get("admin", f"ServiceRequest/{case_id}").json()
    assert {"reference": f"ImagingStudy/{study['id']}"} not in (request.get("supportingInfo") or [])


def test_orthanc_down_keeps_the_cursor_before_the_study(env: Env) -> None:
    env.sync.feed.poll_once()
    patient = env.patient(f"P6-{env.u}")
    series = env.send("down", 1, patient_id=f"P6-{env.u}")

    def stable_in_orthanc() -> bool:
        since = env.sync.feed.cursor.value
        changes = httpx.get(f"{env.orthanc.url}/changes", params={"since": since}).json()
        return any(c["ChangeType"] == "StableStudy" for c in changes["Changes"])

    until(stable_in_orthanc, timeout=30)
    before = env.sync.feed.cursor.value
    env.orthanc.stop()
    try:
        assert env.sync.feed.poll_once() == 0
        assert env.sync.feed.cursor.value == before
    finally:
        env.orthanc.restart()
    study = env.synced(series.study_uid)
    assert study["subject"]["reference"] == f"Patient/{patient}"
    assert env.sync.feed.cursor.value > before


# -- case uploads ------------------------------------------------------------------------------


def test_dicom_uploaded_to_a_case_lands_in_orthanc_linked(env: Env) -> None:
    patient = env.patient(f"P7-{env.u}")
    case_id, _ = env.case(patient)
    series = make_series(env.tmp / "upload", 1, patient_id="HOSPITAL-ID-NOT-ON-FILE")
    data = series.files[0].read_bytes()
    binary = httpx.post(
        f"{env.base}/Binary",
        headers={**env.headers["req"], "Content-Type": "application/dicom"},
        content=data,
        timeout=30,
    )
    assert binary.status_code == 201, binary.text
    doc = {
        "resourceType": "DocumentReference",
        "status": "current",
        "category": [{"coding": [{"system": DOCUMENT_CATEGORY_SYSTEM, "code": "image"}]}],
        "subject": {"reference": f"Patient/{patient}"},
        "content": [
            {
                "attachment": {
                    "contentType": "application/dicom",
                    "url": f"Binary/{binary.json()['id']}",
                    "size": len(data),
                }
            }
        ],
        "context": {"related": [{"reference": f"ServiceRequest/{case_id}"}]},
    }
    created = env.post("req", "DocumentReference", doc)
    assert created.status_code == 201, created.text
    until(
        lambda: env.sync.uploads.poll_once() or env.sync.feed.studies.links.cases(series.study_uid)
    )
    assert env.sync.feed.studies.links.cases(series.study_uid) == [case_id]
    study = env.synced(series.study_uid)
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{case_id}"}]
    assert study["subject"] == {"reference": f"Patient/{patient}"}
    assert study["numberOfInstances"] == 1
    assert env.sync.uploads.poll_once() == 0  # the cursor moved past it


# -- priors ------------------------------------------------------------------------------------


def test_import_priors_from_the_hospital_pacs(env: Env) -> None:
    mrn = f"P8-{env.u}"
    patient = env.patient(mrn)
    case_id, _ = env.case(patient)
    prior = make_series(
        env.tmp / "prior", 2, patient_id=mrn, accession="OLD-1", study_date="20200101"
    )
    assert store_succeeded(storescu(env.pacs.dicom_port, prior.files, called="PACS"), 2)
    response = env.post("req", f"ServiceRequest/{case_id}/$import-priors", None)
    assert response.status_code == 201, response.text
    task = response.json()
    assert response.headers["location"].split("/_history")[0].endswith(f"Task/{task['id']}")
    assert task["status"] == "requested"
    assert task["code"]["coding"][0] == {
        "system": TASK_CODE_SYSTEM,
        "code": TASK_CODE_IMPORT_PRIORS,
        "display": "Import prior studies",
    }
    assert task["for"] == {"reference": f"Patient/{patient}"}
    assert task["focus"] == {"reference": f"ServiceRequest/{case_id}"}
    assert task["requester"] == {"reference": f"PractitionerRole/{env.req_role}"}

    assert env.sync.priors.poll_once() >= 1
    done = env.get("admin", f"Task/{task['id']}").json()
    assert done["status"] == "completed", done
    counts = {o["type"]["text"]: o.get("valueUnsignedInt") for o in done["output"]}
    assert counts["studies-found"] == 1 and counts["studies-retrieved"] == 1
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{prior.study_uid}"} in [
        o.get("valueIdentifier") for o in done["output"]
    ]
    # its progress was on the Task while it was worked (each step a version)
    history = env.get("admin", f"Task/{task['id']}/_history").json()
    steps = [e["resource"].get("businessStatus", {}).get("text") for e in history["entry"]]
    assert steps[::-1][1:] == [
        "querying the PACS",
        "prior studies found: 1; retrieving",
        "retrieving: 1 of 1 asked for, 1 retrieved",
        "retrieved",
    ]
    # the requester reads its Task
    assert env.get("req", f"Task/{task['id']}").status_code == 200
    study = env.synced(prior.study_uid, timeout=60)
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{case_id}"}]
    assert study["numberOfInstances"] == 2


def test_import_priors_refusals(env: Env) -> None:
    patient = env.patient(f"P9-{env.u}")
    case_id, _ = env.case(patient)
    assign = env.post(
        "admin",
        f"Task/{env.case_task(case_id)}/$assign",
        {
            "resourceType": "Parameters",
            "parameter": [
                {
                    "name": "provider",
                    "valueReference": {"reference": f"PractitionerRole/{env.provider}"},
                }
            ],
        },
    )
    assert assign.status_code == 200, assign.text
    refused = env.post("prov", f"ServiceRequest/{case_id}/$import-priors", None)
    assert refused.status_code == 403, refused.text
    assert _code(refused) == "MSO-PRIORS-403"
    unknown = env.post("admin", f"ServiceRequest/no-such-{env.u}/$import-priors", None)
    assert unknown.status_code == 404, unknown.text
    assert _code(unknown) == "MSO-PRIORS-404"
    by_get = env.get("admin", f"ServiceRequest/{case_id}/$import-priors")
    assert by_get.status_code == 405
    listed = env.get("admin", "metadata").json()
    operations = {
        op["name"]
        for resource in listed["rest"][0]["resource"]
        if resource["type"] == "ServiceRequest"
        for op in resource.get("operation") or ()
    }
    assert "import-priors" in operations


def test_priors_without_a_pacs_fail_the_task(env: Env) -> None:
    patient = env.patient(f"P10-{env.u}")
    case_id, _ = env.case(patient)
    task = env.post("admin", f"ServiceRequest/{case_id}/$import-priors", None).json()
    remote, env.sync.priors.remote = env.sync.priors.remote, None
    try:
        env.sync.priors.poll_once()
    finally:
        env.sync.priors.remote = remote
    failed = env.get("admin", f"Task/{task['id']}").json()
    assert failed["status"] == "failed"
    assert "no hospital PACS" in failed["statusReason"]["text"]


def _code(response: httpx.Response) -> str | None:
    issue = response.json()["issue"][0]
    return next((c["code"] for c in (issue.get("details") or {}).get("coding") or ()), None)


def test_the_service_threads_sync_on_their_own(env: Env) -> None:
    """build_sync's loops, started as gateway.py starts them, sync without being driven."""
    service = build_sync(env.settings, env.gateway.spool)
    service.start()
    try:
        patient = env.patient(f"P11-{env.u}")
        series = env.send("threads", 1, patient_id=f"P11-{env.u}")
        study = until(lambda: env.study(series.study_uid), timeout=40)
        assert study["subject"]["reference"] == f"Patient/{patient}"
    finally:
        service.stop()
