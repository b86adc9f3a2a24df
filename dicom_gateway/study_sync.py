"""One study in Orthanc -> its FHIR R4 ImagingStudy on the MSO server, linked to patient and case.

For a study Orthanc calls stable, :meth:`StudySync.sync` reads its instances in the DICOM JSON
model (DICOM PS3.18 F.2, Orthanc's DICOMweb ``/studies/{uid}/metadata``), maps them with
:mod:`mappings.dicom.imaging_study`, and writes the ImagingStudy
(http://hl7.org/fhir/R4/imagingstudy.html) through the public FHIR API only:

* keyed on its identifier ``urn:dicom:uid|urn:oid:<StudyInstanceUID>``: a conditional update
  (``PUT ImagingStudy?identifier=…``, ``If-Match`` the version read) creates it once and
  updates it in place; when the mapped content equals the stored one nothing is written, so a
  re-sync creates no new version (the server would otherwise store one per PUT);
* ``subject``: the Patient whose identifier is the DICOM PatientID in the system configured for
  its IssuerOfPatientID (else the default PatientID system); with no single match, the subject
  of the case the study is linked to; with neither, the study is not written yet and
  :class:`NoSubject` tells the caller to try again later (ImagingStudy.subject is 1..1, and a
  guessed patient would be worse than a late one);
* ``basedOn``: the case ServiceRequests — the one whose case number equals the AccessionNumber,
  and those recorded in :class:`~dicom_gateway.links.StudyLinks` (uploads, priors); links already
  on the stored ImagingStudy are kept;
* ``endpoint``: one shared Endpoint (``dicom-wado-rs``) at the MSO DICOMweb bridge, created once;
* each case lists the ImagingStudy in ``supportingInfo`` (read, modify, ``PUT`` with
  ``If-Match``; a 412 re-reads). A case the workflow no longer lets change (Done, Cancelled: a
  409) keeps its ImagingStudy link through ``basedOn`` only, with a warning.

Afterwards the bridge's series metadata is fetched once to warm its cache (errors ignored).
Only UIDs and resource ids are logged, UIDs at debug level only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicom_gateway.fhir_client import FhirClient, FhirClientError
from dicom_gateway.links import StudyLinks
from dicom_gateway.orthanc import OrthancClient, OrthancUnavailable
from mappings.dicom.imaging_study import imaging_study, study_keys

log = logging.getLogger(__name__)

CASE_NUMBER_SYSTEM = "https://mso.example.org/fhir/sid/case-number"
"""The server's ``fhir_server.codes.CASE_NUMBER_SYSTEM`` (the gateway cannot import the server;
a unit test keeps the two equal)."""
DICOM_UID_SYSTEM = "urn:dicom:uid"
ENDPOINT_IDENTIFIER_SYSTEM = "https://mso.example.org/fhir/sid/dicomweb-endpoint"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
ORTHANC_DICOMWEB_ROOT = "dicom-web"
"""Where Orthanc's DICOMweb plugin answers (its ``DicomWeb.Root``)."""
SUPPORTING_INFO_TRIES = 5
# The parts of a stored resource the server writes: not compared when deciding to update.
_SERVER_ELEMENTS = ("id", "meta", "text")


class NoSubject(Exception):
    """No Patient matches the study and no linked case names one: try again later."""


class PermanentError(Exception):
    """The study cannot be synced as it is (the server refuses its content): skip it."""


@dataclass(frozen=True)
class PatientSystems:
    """Which identifier system a DICOM PatientID belongs to."""

    default: str
    by_issuer: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, default: str, pairs: str) -> PatientSystems:
        """From the settings' ``issuer_systems`` (``Issuer=system,…``)."""
        by_issuer = {}
        for pair in pairs.split(","):
            issuer, sep, system = pair.partition("=")
            if sep and issuer.strip() and system.strip():
                by_issuer[issuer.strip()] = system.strip()
        return cls(default, by_issuer)

    def system_for(self, issuer: str | None) -> str:
        """The system of PatientIDs issued by ``issuer`` (the default when unknown)."""
        return self.by_issuer.get(issuer or "", self.default)

    def all(self) -> list[str]:
        """Every configured system, the default first."""
        return [self.default, *(s for s in self.by_issuer.values() if s != self.default)]


def endpoint_resource(address: str) -> dict[str, Any]:
    """The Endpoint of the MSO DICOMweb bridge (http://hl7.org/fhir/R4/endpoint.html)."""
    return {
        "resourceType": "Endpoint",
        "identifier": [{"system": ENDPOINT_IDENTIFIER_SYSTEM, "value": address}],
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"},
        "name": "MSO DICOMweb",
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


def comparable(resource: Mapping[str, Any]) -> dict[str, Any]:
    """``resource`` without the elements the server sets."""
    return {k: v for k, v in resource.items() if k not in _SERVER_ELEMENTS}


def reference_id(reference: Any, res_type: str) -> str | None:
    """The id in ``{"reference": "[…/]Type/id[/_history/v]"}`` when it is of ``res_type``."""
    ref = reference.get("reference") if isinstance(reference, Mapping) else reference
    if not isinstance(ref, str):
        return None
    parts = ref.split("/_history/")[0].split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == res_type else None


def is_transient(error: FhirClientError) -> bool:
    """Worth trying again later: no answer, auth renewal, conflicts, throttling, server errors."""
    return error.status in (0, 401, 408, 412, 429) or error.status >= 500


class StudySync:
    """Writes the ImagingStudy of one Orthanc study (see the module docstring)."""

    def __init__(
        self,
        *,
        fhir: FhirClient,
        orthanc: OrthancClient,
        links: StudyLinks,
        patients: PatientSystems,
        dicomweb_url: str,
    ) -> None:
        self.fhir = fhir
        self.orthanc = orthanc
        self.links = links
        self.patients = patients
        self.dicomweb_url = dicomweb_url.rstrip("/")
        self._endpoint_id: str | None = None

    # -- the whole study ------------------------------------------------------------------

    def sync(self, orthanc_id: str) -> dict[str, Any] | None:
        """Sync the Orthanc study ``orthanc_id``; the ImagingStudy written (or found equal),
        ``None`` when Orthanc no longer has the study. Raises :class:`NoSubject`,
        :class:`PermanentError`, or :class:`OrthancUnavailable` / :class:`FhirClientError` for
        failures worth retrying."""
        try:
            study_uid = self.orthanc.study(orthanc_id)["MainDicomTags"]["StudyInstanceUID"]
        except OrthancUnavailable as exc:
            if getattr(exc.__cause__, "http_status_code", None) == 404:
                return None  # deleted from Orthanc since it became stable
            raise
        instances = self.orthanc.get_json(f"{ORTHANC_DICOMWEB_ROOT}/studies/{study_uid}/metadata")
        return self.sync_instances(instances)

    def sync_instances(self, instances: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Write the ImagingStudy of one study's instances (DICOM JSON model)."""
        try:
            body = imaging_study(instances)
            study_uid, patient_id, issuer, accession = study_keys(instances)
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        cases = self._cases(study_uid, accession)
        subject = self._patient(patient_id, issuer) or next(
            (c["subject"] for c in cases if c.get("subject")), None
        )
        if subject is None:
            raise NoSubject("no Patient matches the study's PatientID and no case is linked")
        body["subject"] = {"reference": subject["reference"]}
        body["basedOn"] = [{"reference": f"ServiceRequest/{c['id']}"} for c in cases]
        body["endpoint"] = [{"reference": f"Endpoint/{self.endpoint_id()}"}]
        stored = self._upsert(study_uid, body)
        for case in cases:
            self._list_on_case(case["id"], stored["id"])
        self._warm(study_uid, body)
        log.info("ImagingStudy/%s synced (%d cases)", stored["id"], len(cases))
        return stored

    # -- links ----------------------------------------------------------------------------

    def _cases(self, study_uid: str, accession: str | None) -> list[dict[str, Any]]:
        """The case ServiceRequests of a study: by accession number, then explicit links."""
        found: dict[str, dict[str, Any]] = {}
        if accession:
            params = [("identifier", f"{CASE_NUMBER_SYSTEM}|{accession}")]
            for request in self.fhir.search("ServiceRequest", params):
                found[request["id"]] = request
        for case_id in self.links.cases(study_uid):
            if case_id in found:
                continue
            try:
                found[case_id] = self.fhir.read("ServiceRequest", case_id)
            except FhirClientError as error:
                if is_transient(error):
                    raise
                log.warning("linked case ServiceRequest/%s unreadable: %s", case_id, error.code)
        return list(found.values())

    def _patient(self, patient_id: str | None, issuer: str | None) -> dict[str, str] | None:
        """``{"reference": "Patient/<id>"}`` of the one Patient with this PatientID."""
        if not patient_id:
            return None
        system = self.patients.system_for(issuer)
        matches = self.fhir.search(
            "Patient", [("identifier", f"{system}|{patient_id}"), ("_elements", "id")]
        )
        if len(matches) != 1:
            log.info("study PatientID matches %d Patients", len(matches))
            return None
        return {"reference": f"Patient/{matches[0]['id']}"}

    def endpoint_id(self) -> str:
        """The id of the DICOMweb Endpoint (found or created once, then cached)."""
        if self._endpoint_id is None:
            criteria = f"identifier={ENDPOINT_IDENTIFIER_SYSTEM}|{self.dicomweb_url}"
            created = self.fhir.create(endpoint_resource(self.dicomweb_url), if_none_exist=criteria)
            self._endpoint_id = str(created["id"])
        return self._endpoint_id

    # -- writes ---------------------------------------------------------------------------

    def _upsert(self, study_uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Conditional update keyed on the study's UID identifier; no write when unchanged."""
        criteria = [("identifier", f"{DICOM_UID_SYSTEM}|urn:oid:{study_uid}")]
        existing = self.fhir.search("ImagingStudy", criteria)
        if len(existing) > 1:
            raise PermanentError("several ImagingStudy resources have this study's identifier")
        current = existing[0] if existing else {}
        kept = [b for b in current.get("basedOn") or () if b not in body["basedOn"]]
        body["basedOn"] = body["basedOn"] + kept
        if not body["basedOn"]:
            del body["basedOn"]
        labels = (current.get("meta") or {}).get("security")
        if labels:  # set by the platform (e.g. withheld from providers): kept as they are
            body["meta"] = {"security": labels}
        if current and comparable(current) == comparable(body):
            return current
        version = (current.get("meta") or {}).get("versionId")
        try:
            return self.fhir.conditional_update("ImagingStudy", criteria, body, if_match=version)
        except FhirClientError as error:
            if is_transient(error):
                raise
            raise PermanentError(f"the server refused the ImagingStudy: {error}") from error

    def _list_on_case(self, case_id: str, study_id: str) -> None:
        """Add ``ImagingStudy/<study_id>`` to the case's ``supportingInfo`` (If-Match)."""
        ref = f"ImagingStudy/{study_id}"
        for _ in range(SUPPORTING_INFO_TRIES):
            request = self.fhir.read("ServiceRequest", case_id)
            listed = request.get("supportingInfo") or []
            if any(reference_id(r, "ImagingStudy") == study_id for r in listed):
                return
            request["supportingInfo"] = [*listed, {"reference": ref}]
            version = (request.get("meta") or {}).get("versionId")
            try:
                self.fhir.update(request, if_match=version)
                return
            except FhirClientError as error:
                if error.status == 412:
                    continue  # changed meanwhile: read it again
                if is_transient(error):
                    raise
                log.warning(
                    "ServiceRequest/%s does not list %s (%s): linked by basedOn only",
                    case_id,
                    ref,
                    error.code or error.status,
                )
                return
        raise FhirClientError(412, f"ServiceRequest/{case_id} kept changing")

    def _warm(self, study_uid: str, body: Mapping[str, Any]) -> None:
        """Fetch each series' metadata from the bridge once, so its cache holds it."""
        for series in body.get("series") or ():
            url = f"{self.dicomweb_url}/studies/{study_uid}/series/{series['uid']}/metadata"
            try:
                self.fhir.get_bytes(url, accept="application/dicom+json")
            except FhirClientError as error:
                log.debug("bridge warm-up failed: %s", error)
