"""De-identification on request (DICOM PS3.15 Annex E basic profile): the server's
``ImagingStudy/[id]/$deidentify``, who reads the reversal mapping, what the case's provider
sees, and the gateway's worker end to end with a real Orthanc and a live ``mso serve``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from dicom_gateway import deidentify_task
from dicom_gateway.config import GatewaySettings
from dicom_gateway.deidentify_task import DeidentifyWorker, instance_file
from dicom_gateway.gateway import Gateway
from dicom_gateway.sync import SyncService, build_sync
from fhir_server.codes import (
    CASE_CATEGORY_SECOND_OPINION,
    CASE_CATEGORY_SYSTEM,
    CASE_NUMBER_SYSTEM,
    SECURITY_LABEL_SYSTEM,
    SPECIALTY_SYSTEM,
    TASK_CODE_DEIDENTIFY_IMAGING,
    TASK_CODE_SYSTEM,
    WITHHELD_FROM_PROVIDER,
    concept,
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
from tests.integration.workflow_world import World, build_world
from tests.orthanc_process import Orthanc, require_orthanc, start_orthanc

DICOM_UID = "urn:dicom:uid"
MRN = "urn:mso:test-mrn"
GATEWAY_SCOPE = f"{GatewaySettings().scope} system/Binary.crs"
"""The gateway's default scopes and Binary create (the reversal mapping)."""


def _imaging_study(uid: str, patient: str, *case_ids: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{uid}"}],
        "subject": {"reference": f"Patient/{patient}"},
    }
    if case_ids:
        body["basedOn"] = [{"reference": f"ServiceRequest/{c}"} for c in case_ids]
    return body


def _mapping_of(response: Any) -> dict[str, Any]:
    """The JSON document a Binary read answered: the raw content, or a Binary resource."""
    if response.headers["content-type"].startswith("application/fhir+json"):
        return json.loads(base64.b64decode(response.json()["data"]))
    return json.loads(response.content)


def _code(response: httpx.Response) -> str | None:
    issue = response.json()["issue"][0]
    return next((c["code"] for c in issue.get("details", {}).get("coding", [])), None)


@dataclass
class Shared:
    """A world with one case assigned to provider 1 and an ImagingStudy basedOn it."""

    world: World
    case_id: str
    task_id: str
    study_id: str


@pytest.fixture(scope="module")
def shared(app, client) -> Shared:
    world = build_world(app, client)
    case_id, task_id = world.submit()
    assigned = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    assert assigned.status_code == 200, assigned.text
    made = client.post(
        "/fhir/ImagingStudy",
        json=_imaging_study(f"2.25.{uuid.uuid4().int}", world.patient, case_id),
    )
    assert made.status_code == 201, made.text
    return Shared(world, case_id, task_id, made.json()["id"])


def _deidentify(world: World, who: str, study_id: str, **params: Any) -> httpx.Response:
    body: dict[str, Any] = {"resourceType": "Parameters", "parameter": []}
    for name, value in params.items():
        key = "valueBoolean" if isinstance(value, bool) else "valueReference"
        body["parameter"].append({"name": name, key: value})
    return world.post(who, f"ImagingStudy/{study_id}/$deidentify", body)


# -- the operation -----------------------------------------------------------------------------


def test_admin_gets_a_requested_task(shared: Shared) -> None:
    world = shared.world
    response = _deidentify(world, "admin", shared.study_id)
    assert response.status_code == 201, response.text
    task = response.json()
    assert response.headers["Location"].startswith(f"http://testserver/fhir/Task/{task['id']}/")
    assert task["status"] == "requested" and task["intent"] == "order"
    assert task["code"]["coding"][0] == {
        "system": TASK_CODE_SYSTEM,
        "code": TASK_CODE_DEIDENTIFY_IMAGING,
        "display": "De-identify imaging study",
    }
    assert task["focus"] == {"reference": f"ImagingStudy/{shared.study_id}"}
    assert task["basedOn"] == [{"reference": f"ServiceRequest/{shared.case_id}"}]
    assert task["for"] == {"reference": f"Patient/{world.patient}"}
    found = world.get(
        "admin",
        "Task",
        params={
            "code": f"{TASK_CODE_SYSTEM}|{TASK_CODE_DEIDENTIFY_IMAGING}",
            "status": "requested",
        },
    )
    assert task["id"] in {e["resource"]["id"] for e in found.json().get("entry", [])}


@pytest.mark.parametrize("who", ["reqA", "prov1", "prov2", "patient"])
def test_only_admins_may_ask(shared: Shared, who: str) -> None:
    response = _deidentify(shared.world, who, shared.study_id)
    assert response.status_code == 403, response.text
    assert _code(response) == "MSO-DEID-403"


def test_unknown_study_is_404(shared: Shared) -> None:
    response = _deidentify(shared.world, "admin", f"nope-{uuid.uuid4().hex[:8]}")
    assert response.status_code == 404, response.text


def test_study_without_case_or_with_two_cases_is_422(shared: Shared, client) -> None:
    world = shared.world
    alone = client.post("/fhir/ImagingStudy", json=_imaging_study("2.25.1", world.patient))
    response = _deidentify(world, "admin", alone.json()["id"])
    assert response.status_code == 422 and _code(response) == "MSO-DEID-422"
    other_case, _ = world.submit()
    both = client.post(
        "/fhir/ImagingStudy",
        json=_imaging_study("2.25.2", world.patient, shared.case_id, other_case),
    )
    study_id = both.json()["id"]
    response = _deidentify(world, "admin", study_id)
    assert response.status_code == 422 and _code(response) == "MSO-DEID-422"
    chosen = _deidentify(
        world, "admin", study_id, case={"reference": f"ServiceRequest/{other_case}"}
    )
    assert chosen.status_code == 201, chosen.text
    assert chosen.json()["basedOn"] == [{"reference": f"ServiceRequest/{other_case}"}]


def test_replace_is_recorded_on_the_task(shared: Shared) -> None:
    response = _deidentify(shared.world, "admin", shared.study_id, replace=True)
    assert response.status_code == 201, response.text
    assert response.json()["input"] == [{"type": {"text": "replace"}, "valueBoolean": True}]
    bad = shared.world.post(
        "admin",
        f"ImagingStudy/{shared.study_id}/$deidentify",
        {"resourceType": "Parameters", "parameter": [{"name": "replace", "valueString": "yes"}]},
    )
    assert bad.status_code == 400 and _code(bad) == "MSO-DEID-400"


def test_operation_is_in_the_capability_statement(client) -> None:
    statement = client.get("/fhir/metadata").json()
    imaging = next(r for r in statement["rest"][0]["resource"] if r["type"] == "ImagingStudy")
    assert "deidentify" in {op["name"] for op in imaging.get("operation", [])}


# -- who reads the mapping ---------------------------------------------------------------------


def test_mapping_binary_without_security_context_is_for_admins_and_its_writer(
    shared: Shared, app
) -> None:
    """The gateway (an organization-less system client) stores the mapping as a Binary with no
    securityContext: its access rows are only its OWNER (the client), so no case, patient or
    organization rule reaches it; admins and organization-less system clients see all."""
    world = shared.world
    gateway = {
        "Authorization": "Bearer "
        + token_for(app, role="system", client_id="deid-gateway-test", scopes=GATEWAY_SCOPE)
    }
    mapping = {"uids": [{"original": "1.2.3", "new": "2.25.9"}]}
    binary = {
        "resourceType": "Binary",
        "contentType": "application/json",
        "data": base64.b64encode(json.dumps(mapping).encode()).decode(),
    }
    made = world.client.post("/fhir/Binary", json=binary, headers=gateway)
    assert made.status_code == 201, made.text
    binary_id = made.json()["id"]
    for who in ("reqA", "prov1", "prov2", "patient"):
        response = world.get(who, f"Binary/{binary_id}")
        assert response.status_code == 404, (who, response.text)
        found = world.get(who, "Binary", params={"_id": binary_id})
        assert not found.json().get("entry"), who
    response = world.get("admin", f"Binary/{binary_id}")
    assert response.status_code == 200
    assert _mapping_of(response) == mapping
    assert world.client.get(f"/fhir/Binary/{binary_id}", headers=gateway).status_code == 200


# -- the original study and the case's provider ------------------------------------------------


WITHHELD = {"system": SECURITY_LABEL_SYSTEM, "code": WITHHELD_FROM_PROVIDER}


def test_withheld_original_is_hidden_from_the_provider_only(shared: Shared, client) -> None:
    """The withheld-from-provider label keeps the study from the case's provider by every
    read path, not from its requester or the admin; only operators set or remove it."""
    world = shared.world
    uid = f"2.25.{uuid.uuid4().int}"
    made = client.post(
        "/fhir/ImagingStudy", json=_imaging_study(uid, world.patient, shared.case_id)
    )
    original = made.json()
    study_id = original["id"]
    assert world.get("prov1", f"ImagingStudy/{study_id}").status_code == 200
    labelled = {**original, "meta": {"security": [WITHHELD]}}
    refused = world.put("reqA", f"ImagingStudy/{study_id}", labelled)
    assert refused.status_code == 403 and _code(refused) == "MSO-SEC-403"
    assert world.put("admin", f"ImagingStudy/{study_id}", labelled).status_code == 200
    for who in ("reqA", "admin"):
        assert world.get(who, f"ImagingStudy/{study_id}").status_code == 200, who
    assert world.get("prov1", f"ImagingStudy/{study_id}").status_code == 404
    assert world.get("reqA", "ImagingStudy", params={"_id": study_id}).json()["total"] == 1
    by_case = world.get(
        "prov1", "ImagingStudy", params={"basedon": f"ServiceRequest/{shared.case_id}"}
    )
    found = {e["resource"].get("id") for e in by_case.json().get("entry", [])}
    assert shared.study_id in found and study_id not in found
    included = world.get(
        "prov1",
        "ServiceRequest",
        params={"_id": shared.case_id, "_revinclude": "ImagingStudy:basedon"},
    )
    found = {e["resource"].get("id") for e in included.json().get("entry", [])}
    assert shared.study_id in found and study_id not in found
    assert world.get("prov1", f"ImagingStudy/{study_id}/_history").status_code in (403, 404)
    # the requester may not hand the original back to the provider
    current = world.get("admin", f"ImagingStudy/{study_id}").json()
    unlabelled = {k: v for k, v in current.items() if k != "meta"}
    refused = world.put("reqA", f"ImagingStudy/{study_id}", unlabelled)
    assert refused.status_code == 403 and _code(refused) == "MSO-SEC-403"
    assert world.put("admin", f"ImagingStudy/{study_id}", unlabelled).status_code == 200
    assert world.get("prov1", f"ImagingStudy/{study_id}").status_code == 200


# -- end to end: Orthanc, a live server, the gateway's pieces ----------------------------------


@dataclass
class Live:
    base: str
    orthanc: Orthanc
    gateway: Gateway
    sync: SyncService
    worker: DeidentifyWorker
    tmp: Path
    u: str
    headers: dict[str, dict[str, str]]
    req_role: str
    provider: str

    def call(self, method: str, who: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.base}/{path}", headers=self.headers[who], timeout=30, **kw
        )

    def study(self, uid: str) -> dict[str, Any] | None:
        found = self.call(
            "GET", "admin", "ImagingStudy", params={"identifier": f"{DICOM_UID}|urn:oid:{uid}"}
        )
        entries = found.json().get("entry") or []
        return entries[0]["resource"] if entries else None


@pytest.fixture(scope="module")
def live(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    require_orthanc()
    tmp = tmp_path_factory.mktemp("deidentify")
    u = uuid.uuid4().hex[:8]
    (tmp / "server").mkdir()
    proc, base = start_server(db_url, tmp / "server")
    orthanc = start_orthanc(tmp / "orthanc")
    client_id = f"deid-gateway-{u}"
    key_file = register_gateway_client(db_url, tmp, client_id, GATEWAY_SCOPE)
    settings = GatewaySettings(
        aet="MSOGW",
        port=0,
        orthanc_url=orthanc.url,
        spool_dir=tmp / "spool",
        patient_id_system=MRN,
        client_id=client_id,
        private_key=key_file,
        scope=GATEWAY_SCOPE,
        poll_interval=0.2,
        retry_max=1.0,
    )
    gateway = Gateway(settings)  # SCP, spool, forwarders
    gateway.start()
    sync = build_sync(settings.model_copy(update={"fhir_base_url": base}), gateway.spool)
    worker = DeidentifyWorker(
        fhir=sync.fhir, orthanc=sync.orthanc, spool=gateway.spool, links=sync.feed.studies.links
    )
    db_settings = Settings(database_url=db_url, base_url=base)
    org, req_role, provider = f"org-{u}", f"rq-{u}", f"pv-{u}"
    specialty = concept(SPECIALTY_SYSTEM, "oncology")

    def header(**kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(db_settings, audience=base, **kw)}"}

    headers = {
        "admin": header(role="admin"),
        "req": header(role="requester", organization=org, practitioner_role=req_role),
        "prov": header(role="provider", practitioner_role=provider),
    }
    live = Live(base, orthanc, gateway, sync, worker, tmp, u, headers, req_role, provider)
    for rtype, rid, body in (
        ("Organization", org, {"name": f"Hospital {u}"}),
        ("PractitionerRole", req_role, {"organization": {"reference": f"Organization/{org}"}}),
        ("PractitionerRole", provider, {"active": True, "specialty": [specialty]}),
    ):
        response = live.call(
            "PUT", "admin", f"{rtype}/{rid}", json={"resourceType": rtype, "id": rid, **body}
        )
        assert response.status_code in (200, 201), response.text
    try:
        yield live
    finally:
        sync.stop()
        gateway.stop()
        orthanc.stop()
        stop_server(proc)


def _case_with_study(
    live: Live, name: str, *, burned_in: bool = False
) -> tuple[str, str, str, Any]:
    """A patient, a case assigned to the provider, and its synced study of two instances:
    (patient id, case id, ImagingStudy id, the series written)."""
    mrn = f"{name}-{live.u}"
    patient = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}]}
    patient_id = live.call("POST", "admin", "Patient", json=patient).json()["id"]
    request = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [concept(CASE_CATEGORY_SYSTEM, CASE_CATEGORY_SECOND_OPINION)],
        "code": concept(SPECIALTY_SYSTEM, "oncology"),
        "subject": {"reference": f"Patient/{patient_id}"},
        "requester": {"reference": f"PractitionerRole/{live.req_role}"},
    }
    created = live.call("POST", "req", "ServiceRequest", json=request)
    assert created.status_code == 201, created.text
    case_id = created.json()["id"]
    number = next(
        i["value"] for i in created.json()["identifier"] if i["system"] == CASE_NUMBER_SYSTEM
    )
    task = live.call("GET", "admin", "Task", params={"focus": f"ServiceRequest/{case_id}"})
    task_id = task.json()["entry"][0]["resource"]["id"]
    assign = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "provider",
                "valueReference": {"reference": f"PractitionerRole/{live.provider}"},
            }
        ],
    }
    assigned = live.call("POST", "admin", f"Task/{task_id}/$assign", json=assign)
    assert assigned.status_code == 200, assigned.text
    written = make_series(
        live.tmp / f"{name}-{uuid.uuid4().hex[:6]}",
        2,
        patient_id=mrn,
        patient_name=f"Doe^{name}{live.u}",
        accession=number,
    )
    if burned_in:
        for path in written.files[1:]:
            ds = pydicom.dcmread(path)
            ds.BurnedInAnnotation = "YES"
            ds.save_as(path, enforce_file_format=True)
    result = storescu(live.orthanc.dicom_port, written.files, called=live.orthanc.aet)
    assert store_succeeded(result, 2), result.stderr[-2000:]
    study = until(lambda: live.study(written.study_uid), step=live.sync.feed.poll_once, timeout=40)
    return patient_id, case_id, study["id"], written


def _requested(live: Live, study_id: str, *, replace: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Parameters"}
    if replace:
        body["parameter"] = [{"name": "replace", "valueBoolean": True}]
    response = live.call("POST", "admin", f"ImagingStudy/{study_id}/$deidentify", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_end_to_end_copy_is_deidentified_linked_and_mapped(live: Live) -> None:
    patient_id, case_id, study_id, written = _case_with_study(live, "E2E")
    task = _requested(live, study_id)
    assert live.worker.run_once() >= 1
    done = live.call("GET", "admin", f"Task/{task['id']}").json()
    assert done["status"] == "completed", done.get("statusReason")
    outputs = {o["type"]["text"]: o for o in done["output"]}
    new_uid = outputs["deidentified-study"]["valueIdentifier"]["value"].removeprefix("urn:oid:")
    mapping_ref = outputs["mapping"]["valueReference"]["reference"]
    assert new_uid.startswith("2.25.") and new_uid != written.study_uid

    # the copy reaches Orthanc through the spool and is synced, linked to the case and patient
    live.gateway.forwarders.wait_idle(30)
    copy = until(lambda: live.study(new_uid), step=live.sync.feed.poll_once, timeout=40)
    assert copy["basedOn"] == [{"reference": f"ServiceRequest/{case_id}"}]
    assert copy["subject"] == {"reference": f"Patient/{patient_id}"}
    assert copy["numberOfInstances"] == 2
    assert live.call("GET", "prov", f"ImagingStudy/{copy['id']}").status_code == 200

    # its instances carry no identity of the patient
    orthanc_id = live.sync.orthanc.find_study(new_uid)
    instances = live.sync.orthanc.study_instances(orthanc_id)
    data = instance_file(live.sync.orthanc, instances[0]["ID"])
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert str(ds.PatientID).startswith("MSO-ANON-") and ds.PatientName == ds.PatientID
    assert ds.AccessionNumber == "" and ds.StudyDate == ""
    for secret in (f"E2E-{live.u}", f"Doe^E2E{live.u}", written.study_uid, *written.sop_uids):
        assert secret.encode() not in data

    # the mapping reverses it, and only the admin (and the gateway) read it
    binary_id = mapping_ref.split("/")[1]
    for who in ("req", "prov"):
        assert live.call("GET", who, f"Binary/{binary_id}").status_code == 404, who
    raw = live.call("GET", "admin", f"Binary/{binary_id}")
    assert raw.status_code == 200
    document = _mapping_of(raw)
    assert document["studyInstanceUid"] == {"original": written.study_uid, "new": new_uid}
    reverse = {entry["new"]: entry["original"] for entry in document["uids"]}
    assert {reverse[i["MainDicomTags"]["SOPInstanceUID"]] for i in instances} == set(
        written.sop_uids
    )
    assert document["patient"]["pseudonym"] == ds.PatientID
    assert document["subject"] == f"Patient/{patient_id}"
    assert (
        document["patient"]["patientIdSha256"]
        == hashlib.sha256(f"E2E-{live.u}".encode()).hexdigest()
    )


def test_end_to_end_replace_shows_the_provider_only_the_copy(live: Live) -> None:
    _, _, study_id, written = _case_with_study(live, "REPL")
    task = _requested(live, study_id, replace=True)
    assert live.worker.run_once() >= 1
    done = live.call("GET", "admin", f"Task/{task['id']}").json()
    assert done["status"] == "completed", done.get("statusReason")
    outputs = {o["type"]["text"]: o for o in done["output"]}
    new_uid = outputs["deidentified-study"]["valueIdentifier"]["value"].removeprefix("urn:oid:")
    live.gateway.forwarders.wait_idle(30)
    copy = until(lambda: live.study(new_uid), step=live.sync.feed.poll_once, timeout=40)
    assert live.call("GET", "prov", f"ImagingStudy/{copy['id']}").status_code == 200
    assert live.call("GET", "prov", f"ImagingStudy/{study_id}").status_code == 404
    for who in ("req", "admin"):
        assert live.call("GET", who, f"ImagingStudy/{study_id}").status_code == 200, who
    # a later sync that rewrites the original keeps the label
    edited = live.call("GET", "admin", f"ImagingStudy/{study_id}").json()
    edited["description"] = "edited by hand"
    assert live.call("PUT", "admin", f"ImagingStudy/{study_id}", json=edited).status_code == 200
    live.sync.feed.studies.sync_instances(
        live.sync.orthanc.get_json(f"dicom-web/studies/{written.study_uid}/metadata")
    )
    again = live.call("GET", "admin", f"ImagingStudy/{study_id}").json()
    assert {"system": SECURITY_LABEL_SYSTEM, "code": WITHHELD_FROM_PROVIDER} in again["meta"][
        "security"
    ]
    assert live.call("GET", "prov", f"ImagingStudy/{study_id}").status_code == 404


def test_gateway_constants_match_the_server() -> None:
    assert deidentify_task.SECURITY_LABEL_SYSTEM == SECURITY_LABEL_SYSTEM
    assert deidentify_task.WITHHELD_FROM_PROVIDER == WITHHELD_FROM_PROVIDER


def test_end_to_end_a_task_left_in_progress_is_worked_again_into_the_same_copy(
    live: Live,
) -> None:
    """A gateway killed while working a Task leaves it in-progress: after the lease another
    pass takes it and makes the same copy (same UIDs, same mapping Binary), not a second."""
    _, _, study_id, _ = _case_with_study(live, "AGAIN")
    task = _requested(live, study_id)
    assert live.worker.run_once() >= 1
    live.gateway.forwarders.wait_idle(30)
    first = live.call("GET", "admin", f"Task/{task['id']}").json()
    assert first["status"] == "completed", first.get("statusReason")
    instances = live.orthanc.instance_count()
    left = {k: v for k, v in first.items() if k not in ("output", "businessStatus")}
    left["status"] = "in-progress"  # as a gateway that died after claiming it leaves it
    assert live.call("PUT", "admin", f"Task/{task['id']}", json=left).status_code == 200
    assert live.worker.run_once() == 0  # within the lease: still someone else's
    again_worker = DeidentifyWorker(
        fhir=live.sync.fhir,
        orthanc=live.sync.orthanc,
        spool=live.gateway.spool,
        links=live.sync.feed.studies.links,
        secret=live.worker.secret,
        lease=0,
    )
    assert again_worker.run_once() >= 1
    live.gateway.forwarders.wait_idle(30)
    second = live.call("GET", "admin", f"Task/{task['id']}").json()
    assert second["status"] == "completed", second.get("statusReason")
    assert second["output"] == first["output"]
    assert live.orthanc.instance_count() == instances


def test_end_to_end_burned_in_annotation_fails_the_task(live: Live) -> None:
    _, _, study_id, _ = _case_with_study(live, "BURNED", burned_in=True)
    before = live.orthanc.instance_count()
    task = _requested(live, study_id)
    live.worker.run_once()
    done = live.call("GET", "admin", f"Task/{task['id']}").json()
    assert done["status"] == "failed"
    assert "burned-in annotation" in done["statusReason"]["text"]
    assert "output" not in done
    live.gateway.forwarders.wait_idle(10)
    assert live.orthanc.instance_count() == before  # nothing was sent
