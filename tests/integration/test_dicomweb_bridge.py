"""The DICOMweb bridge against a real Orthanc (DICOM PS3.18 10.4 WADO-RS, 10.5 STOW-RS, 10.6
QIDO-RS), through a live ``mso serve`` and dicomweb-client, as a viewer would use it.

The world: case 1 of requester A's organization, assigned to provider 1, has two studies (CT
and a generated multi-instance series); a third study (MR) is in Orthanc with no ImagingStudy
on any case. Requester A and provider 1 see the case's two; provider 2 and a requester of
another organization see nothing (empty searches, 404s); a system client sees all three.
"""

from __future__ import annotations

import base64
import gzip
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from fhir_server.codes import SECURITY_LABEL_SYSTEM, WITHHELD_FROM_PROVIDER
from tests.auth_helpers import token_for
from tests.conftest import make_settings
from tests.dicom_helpers import make_series
from tests.e2e.conftest import start_server, stop_server
from tests.integration.workflow_world import World, build_world
from tests.orthanc_process import Orthanc, require_orthanc, start_orthanc
from tests.smtp_server import free_port

SERIES_SIZE = 5
FRAMES = 3  # the generated series is multi-frame


# -- DICOM files -----------------------------------------------------------------------------


def store(orthanc: Orthanc, paths: list[Path | str]) -> None:
    result = subprocess.run(
        ["storescu", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-500:]


def study_uid_of(path: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# -- the world -------------------------------------------------------------------------------


@dataclass
class Bridge:
    """A live server with the bridge, its Orthanc, the FHIR world and tokens for the server."""

    root: str  # http://127.0.0.1:<port>
    orthanc: Orthanc
    world: World
    ct: str
    mr: str
    gen: str
    gen_series: str
    imaging_study: str
    tokens: dict[str, str]
    folder: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.root}/dicomweb"

    def client(self, who: str) -> DICOMwebClient:
        session = _PortKeepingSession()
        session.headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return DICOMwebClient(url=self.dicomweb, session=session)

    def get(self, who: str | None, path: str, **kw) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if who:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return httpx.get(f"{self.dicomweb}{path}", headers=headers, timeout=60, **kw)


class _PortKeepingSession(requests.Session):
    """dicomweb-client sets ``Host`` to the URL's host without its port; on a test port the
    server would derive another base URL (token audience, rebased URLs) from it."""

    def request(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        (kwargs.get("headers") or {}).pop("Host", None)
        return super().request(method, url, *args, **kwargs)


def imaging_study(uid: str, patient: str, case: str) -> dict:
    return {
        "resourceType": "ImagingStudy",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "subject": {"reference": f"Patient/{patient}"},
        "basedOn": [{"reference": f"ServiceRequest/{case}"}],
    }


@pytest.fixture(scope="module")
def bridge(app, client, db_url, tmp_path_factory) -> Iterator[Bridge]:
    require_orthanc()
    folder = tmp_path_factory.mktemp("dicomweb")
    orthanc = start_orthanc(folder / "orthanc")
    proc = None
    try:
        ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
        series = make_series(folder / "gen", SERIES_SIZE, frames=FRAMES)
        gen, gen_series = series.study_uid, series.series_uid
        store(orthanc, [ct, mr, *series.files])
        world = build_world(app, client)
        sr_id, task_id = world.submit()
        assigned = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
        assert assigned.status_code == 200, assigned.text
        ids = []
        for uid in (study_uid_of(ct), gen):
            made = client.post("/fhir/ImagingStudy", json=imaging_study(uid, world.patient, sr_id))
            assert made.status_code == 201, made.text
            ids.append(made.json()["id"])
        other_org, other_role = f"org2-{world.u}", f"rq2-{world.u}"
        client.put(f"/fhir/Organization/{other_org}", json={"resourceType": "Organization",
                   "id": other_org, "name": "Elsewhere"})  # fmt: skip
        client.put(
            f"/fhir/PractitionerRole/{other_role}",
            json={
                "resourceType": "PractitionerRole",
                "id": other_role,
                "active": True,
                "organization": {"reference": f"Organization/{other_org}"},
            },
        )
        (folder / "server").mkdir()
        proc, base = start_server(
            db_url, folder / "server", workers=1, env={"MSO_ORTHANC_URL": orthanc.url}
        )
        root = base.removesuffix("/fhir")
        aud = {"audience": base}
        tokens = {
            "system": token_for(app, role="system", scopes="system/*.cruds", **aud),
            "reqA": token_for(
                app, role="requester", organization=world.org,
                practitioner_role=world.req_role, **aud,
            ),
            "prov1": token_for(app, role="provider", practitioner_role=world.prov1, **aud),
            "prov2": token_for(app, role="provider", practitioner_role=world.prov2, **aud),
            "other": token_for(
                app, role="requester", organization=other_org,
                practitioner_role=other_role, **aud,
            ),
        }  # fmt: skip
        yield Bridge(
            root, orthanc, world, study_uid_of(ct), study_uid_of(mr), gen, gen_series, ids[1],
            tokens, folder,
        )  # fmt: skip
    finally:
        if proc is not None:
            stop_server(proc)
        orthanc.stop()


def uids(matches: list[dict], tag: str = "0020000D") -> set[str]:
    return {m[tag]["Value"][0] for m in matches}


# -- authentication --------------------------------------------------------------------------


def test_no_token_or_a_bad_token_is_a_401_outcome(bridge: Bridge) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        response = bridge.get(None, f"/studies/{bridge.ct}/metadata", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["resourceType"] == "OperationOutcome"
        assert bridge.ct not in response.text


# -- QIDO-RS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["reqA", "prov1"])
def test_the_case_parties_find_the_case_studies_only(bridge: Bridge, who: str) -> None:
    dw = bridge.client(who)
    assert uids(dw.search_for_studies()) == {bridge.ct, bridge.gen}
    assert uids(dw.search_for_series()) == {bridge.ct, bridge.gen}
    found = dw.search_for_instances(search_filters={"StudyInstanceUID": bridge.gen})
    assert len(found) == SERIES_SIZE
    nested = dw.search_for_series(study_instance_uid=bridge.gen)
    assert uids(nested, "0020000E") == {bridge.gen_series}


def test_a_system_client_finds_every_study(bridge: Bridge) -> None:
    found = uids(bridge.client("system").search_for_studies())
    assert {bridge.ct, bridge.mr, bridge.gen} <= found


def test_restricted_paging_and_query_keys(bridge: Bridge) -> None:
    dw = bridge.client("reqA")
    first = dw.search_for_studies(limit=1)
    second = dw.search_for_studies(limit=1, offset=1)
    third = dw.search_for_studies(limit=1, offset=2)
    assert len(first) == len(second) == 1 and third == []
    assert uids(first) | uids(second) == {bridge.ct, bridge.gen}
    # naming a hidden study in the query finds nothing; the standard keys pass through
    assert dw.search_for_studies(search_filters={"StudyInstanceUID": bridge.mr}) == []
    modality = dw.search_for_series(search_filters={"Modality": "CT"}, fields=["all"])
    assert uids(modality) == {bridge.ct, bridge.gen}
    assert dw.search_for_studies(fuzzymatching=True, search_filters={"PatientID": "none"}) == []


def test_query_urls_point_at_the_bridge(bridge: Bridge) -> None:
    response = bridge.get("reqA", "/studies")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    urls = [m["00081190"]["Value"][0] for m in response.json()]
    assert urls and all(u.startswith(f"{bridge.dicomweb}/studies/") for u in urls)
    assert bridge.orthanc.url not in response.text


def test_bad_paging_is_a_400(bridge: Bridge) -> None:
    response = bridge.get("reqA", "/studies", params={"limit": "-1"})
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("who", ["prov2", "other"])
def test_others_find_nothing_and_every_study_path_is_a_404(bridge: Bridge, who: str) -> None:
    dw = bridge.client(who)
    assert dw.search_for_studies() == []
    assert dw.search_for_series() == []
    assert dw.search_for_instances() == []
    ct_series = bridge.client("system").search_for_series(study_instance_uid=bridge.ct)
    series = ct_series[0]["0020000E"]["Value"][0]
    for path in (
        f"/studies/{bridge.ct}",
        f"/studies/{bridge.ct}/metadata",
        f"/studies/{bridge.ct}/series",
        f"/studies/{bridge.ct}/instances",
        f"/studies/{bridge.ct}/series/{series}/metadata",
        f"/studies/{bridge.ct}/series/{series}/instances",
        f"/studies/{bridge.gen}/series/{bridge.gen_series}/metadata",
        "/studies/1.2.3.4.5.6.7.8.9/metadata",  # unknown: the same answer
    ):
        response = bridge.get(who, path)
        assert response.status_code == 404, path
        assert response.json()["resourceType"] == "OperationOutcome"
        assert bridge.ct not in response.text and bridge.gen not in response.text


def test_a_study_without_imaging_study_is_hidden_from_the_requester(bridge: Bridge) -> None:
    assert bridge.get("reqA", f"/studies/{bridge.mr}/metadata").status_code == 404
    assert bridge.get("system", f"/studies/{bridge.mr}/metadata").status_code == 200


# -- WADO-RS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["reqA", "prov1"])
def test_retrieve_study_frames_and_rendered(bridge: Bridge, who: str) -> None:
    dw = bridge.client(who)
    instances = dw.retrieve_study(bridge.gen)
    assert len(instances) == SERIES_SIZE
    sop = str(instances[0].SOPInstanceUID)
    frames = dw.retrieve_instance_frames(
        bridge.gen, bridge.gen_series, sop, frame_numbers=[2, 3],
        media_types=(("application/octet-stream", "*"),),
    )  # fmt: skip
    assert len(frames) == 2 and len(frames[0]) == 16 * 16 * 2
    rendered = dw.retrieve_instance_rendered(
        bridge.gen, bridge.gen_series, sop, media_types=("image/jpeg",)
    )
    assert rendered[:2] == b"\xff\xd8"


def test_transfer_syntax_star_is_passed_through(bridge: Bridge) -> None:
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    sop = bridge.client("reqA").search_for_instances(bridge.gen)[0]["00080018"]["Value"][0]
    path = f"/studies/{bridge.gen}/series/{bridge.gen_series}/instances/{sop}/frames/1"
    response = bridge.get("reqA", path, headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("multipart/related")
    assert "application/octet-stream" in response.headers["content-type"]


def test_series_metadata_urls_cache_gzip_and_invalidation(bridge: Bridge, client) -> None:
    path = f"/studies/{bridge.gen}/series/{bridge.gen_series}/metadata"
    metadata = bridge.client("prov1").retrieve_series_metadata(bridge.gen, bridge.gen_series)
    assert len(metadata) == SERIES_SIZE
    bulk = [a["BulkDataURI"] for m in metadata for a in m.values() if "BulkDataURI" in a]
    assert bulk and all(u.startswith(f"{bridge.dicomweb}/studies/{bridge.gen}/") for u in bulk)
    first = bridge.get("reqA", path, headers={"Accept-Encoding": "identity"})
    assert first.headers["x-mso-metadata-cache"] == "hit"
    assert "content-encoding" not in first.headers
    raw = httpx.Client(timeout=30).send(
        httpx.Request(
            "GET",
            f"{bridge.dicomweb}{path}",
            headers={
                "Authorization": f"Bearer {bridge.tokens['reqA']}",
                "Accept-Encoding": "gzip",
            },
        ),
        stream=True,
    )
    compressed = b"".join(raw.iter_raw())
    assert raw.headers["content-encoding"] == "gzip"
    assert gzip.decompress(compressed) == first.content
    etag = first.headers["etag"]
    unchanged = bridge.get("reqA", path, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    # the ImagingStudy changes (the gateway syncs new instances): the entry is filled again
    body = client.get(f"/fhir/ImagingStudy/{bridge.imaging_study}").json()
    body["numberOfInstances"] = SERIES_SIZE
    assert client.put(f"/fhir/ImagingStudy/{bridge.imaging_study}", json=body).status_code == 200
    refilled = bridge.get("reqA", path)
    assert refilled.headers["x-mso-metadata-cache"] == "miss"
    assert bridge.get("reqA", path).headers["x-mso-metadata-cache"] == "hit"


def test_study_and_instance_metadata_urls_point_at_the_bridge(bridge: Bridge) -> None:
    metadata = bridge.client("reqA").retrieve_study_metadata(bridge.ct)
    bulk = [a["BulkDataURI"] for m in metadata for a in m.values() if "BulkDataURI" in a]
    assert bulk and all(u.startswith(bridge.dicomweb) for u in bulk)
    blob = bridge.get("reqA", bulk[0].removeprefix(bridge.dicomweb))
    assert blob.status_code == 200 and len(blob.content) > 0


# -- STOW-RS ---------------------------------------------------------------------------------


def test_store_instances(bridge: Bridge) -> None:
    made = make_series(bridge.folder / "stow", 1)
    study, paths = made.study_uid, made.files
    answer = bridge.client("system").store_instances([pydicom.dcmread(paths[0])])
    stored = answer.ReferencedSOPSequence[0].RetrieveURL
    assert stored.startswith(f"{bridge.dicomweb}/studies/{study}/")
    assert study in uids(bridge.client("system").search_for_studies())
    # a requester stores into a study of its case only
    ds = pydicom.dcmread(make_series(bridge.folder / "stow2", 1).files[0])
    ds.StudyInstanceUID = bridge.gen
    answer = bridge.client("reqA").store_instances([ds], study_instance_uid=bridge.gen)
    assert answer.ReferencedSOPSequence[0].RetrieveURL.startswith(bridge.dicomweb)
    with pytest.raises(requests.HTTPError) as refused:
        bridge.client("reqA").store_instances([pydicom.dcmread(paths[0])])
    assert refused.value.response.status_code == 403
    with pytest.raises(requests.HTTPError) as hidden:
        bridge.client("other").store_instances([ds], study_instance_uid=bridge.gen)
    assert hidden.value.response.status_code == 404


# -- configuration and failures (in process) -------------------------------------------------


def test_without_orthanc_the_bridge_is_a_503(client) -> None:
    response = client.get("/dicomweb/studies")
    assert response.status_code == 503
    assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "MSO-DICOMWEB-503"


def test_orthanc_down_is_a_502_without_data(db_url, tmp_path) -> None:
    from fhir_server.app import create_app

    settings = make_settings(db_url, tmp_path, orthanc_url=f"http://127.0.0.1:{free_port()}")
    app = create_app(settings)
    token = token_for(app, role="system", scopes="system/*.cruds")
    with TestClient(app, base_url="http://testserver") as http:
        response = http.get(
            "/dicomweb/studies/1.2.3/metadata", headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 502
    outcome = response.json()
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "MSO-DICOMWEB-502"
    assert "1.2.3" not in response.text


def test_capability_statement_names_the_bridge(client) -> None:
    statement = client.get("/fhir/metadata").json()
    urls = [e.get("valueUrl") for e in statement["rest"][0]["extension"]]
    assert "http://testserver/dicomweb" in urls


def test_a_retrieve_leaves_an_audit_event(bridge: Bridge, client) -> None:
    path = f"/studies/{bridge.gen}/series/{bridge.gen_series}/metadata"
    assert bridge.get("prov1", path).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = client.get(
            "/fhir/AuditEvent",
            params={"entity": f"ImagingStudy/{bridge.imaging_study}", "subtype": "read"},
        ).json()
        queries = [
            base64.b64decode(e["query"]).decode()
            for entry in found.get("entry", [])
            for e in entry["resource"].get("entity", [])
            if "query" in e
        ]
        if f"GET /dicomweb{path}" in queries:
            return
        time.sleep(0.2)
    pytest.fail("no AuditEvent for the DICOMweb retrieve")


def test_a_study_withheld_from_providers_is_gone_for_the_provider_only(
    bridge: Bridge, client
) -> None:
    """The withheld-from-provider label (the original of a study shared de-identified) holds on
    the DICOMweb path too: the case's provider neither finds nor retrieves it."""
    body = client.get(f"/fhir/ImagingStudy/{bridge.imaging_study}").json()
    label = {"system": SECURITY_LABEL_SYSTEM, "code": WITHHELD_FROM_PROVIDER}
    labelled = {**body, "meta": {"security": [label]}}
    assert (
        client.put(f"/fhir/ImagingStudy/{bridge.imaging_study}", json=labelled).status_code == 200
    )
    try:
        assert uids(bridge.client("prov1").search_for_studies()) == {bridge.ct}
        assert bridge.get("prov1", f"/studies/{bridge.gen}/metadata").status_code == 404
        path = f"/studies/{bridge.gen}/series/{bridge.gen_series}/metadata"
        assert bridge.get("prov1", path).status_code == 404
        assert uids(bridge.client("reqA").search_for_studies()) == {bridge.ct, bridge.gen}
        assert bridge.get("reqA", path).status_code == 200
    finally:
        current = client.get(f"/fhir/ImagingStudy/{bridge.imaging_study}").json()
        unlabelled = {k: v for k, v in current.items() if k != "meta"}
        client.put(f"/fhir/ImagingStudy/{bridge.imaging_study}", json=unlabelled)
    assert uids(bridge.client("prov1").search_for_studies()) == {bridge.ct, bridge.gen}


def test_a_deleted_imaging_study_takes_its_cached_metadata_with_it(
    bridge: Bridge, client, app
) -> None:
    """The cache holds the patient's data: it goes with the ImagingStudy, in its transaction."""
    from sqlalchemy import func, select

    from fhir_server.storage.dicomweb_schema import dicomweb_metadata_cache as cache

    patient = client.post("/fhir/Patient", json={"resourceType": "Patient"}).json()["id"]
    body = {k: v for k, v in imaging_study(bridge.mr, patient, "-").items() if k != "basedOn"}
    made = client.post("/fhir/ImagingStudy", json=body)  # nobody's case: system and admins only
    assert made.status_code == 201, made.text
    series = bridge.client("system").search_for_series(study_instance_uid=bridge.mr)
    series_uid = series[0]["0020000E"]["Value"][0]
    path = f"/studies/{bridge.mr}/series/{series_uid}/metadata"
    assert bridge.get("system", path).headers["x-mso-metadata-cache"] == "miss"

    def rows() -> int:
        with app.state.repo.engine.connect() as conn:
            count = select(func.count()).select_from(cache).where(cache.c.study_uid == bridge.mr)
            return int(conn.execute(count).scalar_one())

    assert rows() == 1
    assert client.delete(f"/fhir/ImagingStudy/{made.json()['id']}").status_code in (200, 204)
    assert rows() == 0
