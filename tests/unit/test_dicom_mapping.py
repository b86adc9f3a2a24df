"""The DICOM -> ImagingStudy mapping (mappings/dicom), on pydicom's test files converted to the
DICOM JSON model (PS3.18 F.2) with ``Dataset.to_json_dict()``; plus the gateway's pure helpers."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_gateway.priors import TASK_CODE_IMPORT_PRIORS, outputs
from dicom_gateway.qr_scu import RemoteAE
from dicom_gateway.study_sync import (
    CASE_NUMBER_SYSTEM,
    PatientSystems,
    comparable,
    reference_id,
)
from dicom_gateway.sync import dicomweb_base
from dicom_gateway.tasks import TASK_CODE_SYSTEM
from mappings.dicom.imaging_study import imaging_study, study_keys, table

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"


def _base(name: str = "CT_small.dcm") -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _instance(ds: Dataset, *, series: str, number: int, **tags: object) -> dict:
    copy_ = copy.deepcopy(ds)
    copy_.SeriesInstanceUID = series
    copy_.SOPInstanceUID = generate_uid()
    copy_.InstanceNumber = number
    for keyword, value in tags.items():
        if value is None:
            copy_.pop(keyword, None)
        else:
            setattr(copy_, keyword, value)
    return copy_.to_json_dict()


@pytest.fixture
def study() -> tuple[list[dict], str, str, str]:
    """Two CT series (3 + 2 instances, body parts CHEST and an unknown one) and an MR one."""
    ct = _base()
    ct.StudyInstanceUID = study_uid = generate_uid()
    ct.AccessionNumber = "CASE-ABC123"
    ct.StudyDescription = "Thorax scan"
    ct.ReferringPhysicianName = "House^Gregory"
    ct.TimezoneOffsetFromUTC = "+0200"
    s1, s2, s3 = generate_uid(), generate_uid(), generate_uid()
    instances = [
        _instance(ct, series=s1, number=n, SeriesNumber=1, BodyPartExamined="CHEST")
        for n in (3, 1, 2)
    ]
    instances += [
        _instance(ct, series=s2, number=n, SeriesNumber=2, BodyPartExamined="TOE", Laterality="L")
        for n in (1, 2)
    ]
    mr = _base("MR_small.dcm")
    for keyword in ("StudyInstanceUID", "AccessionNumber", "PatientID"):
        setattr(mr, keyword, getattr(ct, keyword))
    instances.append(_instance(mr, series=s3, number=1, SeriesNumber=3, BodyPartExamined=None))
    return instances, study_uid, s1, s2


def test_study_level_elements(study) -> None:
    instances, uid, _, _ = study
    body = imaging_study(instances)
    assert body["resourceType"] == "ImagingStudy"
    assert body["status"] == "available"
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"} in body["identifier"]
    accession = next(i for i in body["identifier"] if "type" in i)
    assert accession["value"] == "CASE-ABC123"
    assert accession["type"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
        "code": "ACSN",
    }
    assert body["started"] == "2004-01-19T07:27:30+02:00"
    assert body["description"] == "Thorax scan"
    assert body["referrer"] == {"display": "Gregory House"}
    assert body["modality"] == [{"system": DCM, "code": "CT"}, {"system": DCM, "code": "MR"}]
    assert "subject" not in body and "endpoint" not in body


def test_series_instances_and_counts(study) -> None:
    instances, _, s1, s2 = study
    body = imaging_study(instances)
    assert body["numberOfSeries"] == 3
    assert body["numberOfInstances"] == 6
    first, second, third = body["series"]
    assert (first["uid"], first["number"], first["numberOfInstances"]) == (s1, 1, 3)
    assert [i["number"] for i in first["instance"]] == [1, 2, 3]
    assert first["modality"] == {"system": DCM, "code": "CT"}
    assert first["bodySite"] == {"system": SNOMED, "code": "51185008", "display": "Thorax"}
    assert first["instance"][0]["sopClass"] == {
        "system": "urn:ietf:rfc:3986",
        "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2",
    }
    assert (second["uid"], second["numberOfInstances"]) == (s2, 2)
    assert second["bodySite"] == {"display": "TOE"}  # not in the table: text only
    assert second["laterality"] == {"system": SNOMED, "code": "7771000", "display": "Left"}
    assert third["modality"]["code"] == "MR"
    assert "bodySite" not in third and "laterality" not in third


def test_duplicate_instances_count_once(study) -> None:
    instances, _, _, _ = study
    body = imaging_study([*instances, instances[0]])
    assert body["numberOfInstances"] == 6


def test_missing_optional_tags() -> None:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID, ds.SOPClassUID = generate_uid(), "1.2.840.10008.5.1.4.1.1.7"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"  # no offset from UTC: the date alone
    body = imaging_study([ds.to_json_dict()])
    assert body["started"] == "2024-01-02"
    assert body["numberOfSeries"] == 1 and body["numberOfInstances"] == 1
    for absent in ("description", "referrer", "modality"):
        assert absent not in body
    series = body["series"][0]
    assert set(series) == {"uid", "numberOfInstances", "instance"}
    assert set(series["instance"][0]) == {"uid", "sopClass"}
    assert study_keys([ds.to_json_dict()]) == (ds.StudyInstanceUID, None, None, None)


def test_study_keys_and_errors(study) -> None:
    instances, uid, _, _ = study
    assert study_keys(instances) == (uid, "1CT1", None, "CASE-ABC123")
    other = Dataset()
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="several"):
        study_keys([*instances, other.to_json_dict()])
    with pytest.raises(ValueError, match="no StudyInstanceUID"):
        imaging_study([Dataset().to_json_dict()])


def test_every_transform_in_the_table_exists() -> None:
    from mappings.dicom.imaging_study import TRANSFORMS

    t = table()
    for level in ("study", "series", "instance"):
        for row in t[level]:
            assert row["transform"] in TRANSFORMS, row
            tags = row.get("tags") or [row["tag"]]
            keywords = row["keyword"] if isinstance(row["keyword"], list) else [row["keyword"]]
            for tag, keyword in zip(tags, keywords, strict=True):
                assert pydicom.datadict.keyword_for_tag(int(tag, 16)) == keyword


# -- gateway helpers --------------------------------------------------------------------------


def test_gateway_constants_equal_the_servers() -> None:
    from fhir_server import codes

    assert CASE_NUMBER_SYSTEM == codes.CASE_NUMBER_SYSTEM
    assert TASK_CODE_SYSTEM == codes.TASK_CODE_SYSTEM
    assert TASK_CODE_IMPORT_PRIORS == codes.TASK_CODE_IMPORT_PRIORS


def test_patient_systems_and_helpers() -> None:
    systems = PatientSystems.parse("urn:default", "HOSP-A=urn:a, HOSP-B=urn:b,broken")
    assert systems.system_for("HOSP-A") == "urn:a"
    assert systems.system_for(None) == systems.system_for("other") == "urn:default"
    assert (
        reference_id({"reference": "http://x/fhir/ServiceRequest/7/_history/2"}, "ServiceRequest")
        == "7"
    )
    assert reference_id({"reference": "Patient/7"}, "ServiceRequest") is None
    assert comparable({"id": "1", "meta": {}, "status": "x"}) == {"status": "x"}
    assert RemoteAE.parse("PACS@10.0.0.1:104") == RemoteAE("PACS", "10.0.0.1", 104)
    with pytest.raises(ValueError):
        RemoteAE.parse("PACS:104")
    found = outputs(["1.2", "1.3"], ["1.2"])
    assert [o.get("valueUnsignedInt") for o in found[:2]] == [2, 1]
    assert found[3]["type"]["text"] == "study-not-retrieved"


def test_dicomweb_base_from_the_fhir_base() -> None:
    from dicom_gateway.config import GatewaySettings

    settings = GatewaySettings(fhir_base_url="http://h:8000/fhir")
    assert dicomweb_base(settings) == "http://h:8000/dicomweb"
    settings = GatewaySettings(fhir_base_url="http://h/fhir", dicomweb_url="http://d/web/")
    assert dicomweb_base(settings) == "http://d/web"
