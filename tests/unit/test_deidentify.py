"""De-identification with the DICOM PS3.15 Annex E Basic Application Level Confidentiality
Profile (``dicom_gateway.deidentify``, table ``mappings/dicom/deidentification.json``), on
pydicom's bundled test files: pure, no sockets."""

from __future__ import annotations

import copy
import io
import json
from importlib import resources

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from dicom_gateway.deidentify import (
    DICOM_UID_ROOT,
    BurnedInAnnotation,
    UidMap,
    deidentify,
    load_profile,
)

FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm")
PSEUDONYM = "MSO-ANON-TEST01"
ACTION_CODES = {"D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}


def _table() -> dict:
    text = resources.files("mappings.dicom").joinpath("deidentification.json").read_text()
    return json.loads(text)


def _read(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not bundled with pydicom"
    return pydicom.dcmread(path)


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _uids(ds: Dataset) -> set[str]:
    found = set()
    for element in ds.iterall():
        if element.VR == "UI" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            found.update(str(v) for v in values)
    return found


# -- the table ---------------------------------------------------------------------------------


def test_table_is_well_formed() -> None:
    table = _table()
    attributes = table["attributes"]
    assert len(attributes) > 200
    for tag, entry in attributes.items():
        assert entry["action"] in ACTION_CODES, tag
        known = keyword_for_tag(int(tag.strip("()").replace(",", ""), 16))
        assert not known or known == entry["keyword"], (tag, known)
    for code in table["resolve"]:
        assert code.startswith("_") or code in ACTION_CODES
    method = table["method"]["DeidentificationMethodCodeSequence"][0]
    assert (method["CodeValue"], method["CodingSchemeDesignator"]) == ("113100", "DCM")


def test_table_covers_the_common_identifying_attributes() -> None:
    attributes = _table()["attributes"]
    actions = {entry["keyword"]: entry["action"] for entry in attributes.values()}
    expected = {
        "PatientName": "Z",
        "PatientID": "Z",
        "PatientBirthDate": "Z",
        "PatientSex": "Z",
        "PatientAge": "X",
        "PatientAddress": "X",
        "OtherPatientIDs": "X",
        "OtherPatientIDsSequence": "X",
        "InstitutionName": "X/Z/D",
        "InstitutionAddress": "X",
        "ReferringPhysicianName": "Z",
        "PerformingPhysicianName": "X",
        "OperatorsName": "X/Z/D",
        "AccessionNumber": "Z",
        "StudyID": "Z",
        "StudyDate": "Z",
        "StudyTime": "Z",
        "ContentDate": "Z/D",
        "SeriesDate": "X/D",
        "StationName": "X/Z/D",
        "DeviceSerialNumber": "X/Z/D",
        "StudyInstanceUID": "U",
        "SeriesInstanceUID": "U",
        "SOPInstanceUID": "U",
        "FrameOfReferenceUID": "U",
        "StudyDescription": "X",
        "SeriesDescription": "X",
        "ReferencedImageSequence": "X/Z/U*",
    }
    assert {k: actions.get(k) for k in expected} == expected
    assert "SOPClassUID" not in actions and "TransferSyntaxUID" not in actions


# -- every identifying attribute ---------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_identifying_attributes_are_gone_or_replaced(name: str) -> None:
    profile = load_profile()
    original = _read(name)
    before = copy.deepcopy(original)
    uid_map = UidMap()
    result = deidentify(original, profile=profile, uid_map=uid_map, pseudonym=PSEUDONYM)
    out = result.dataset
    assert original == before  # the input is not changed

    for element in original:
        tag = element.tag
        if tag.is_private:
            assert tag not in out
            continue
        vr = element.VR.split(" or ")[0]
        action = profile.action_for(tag, vr)
        if action is None:
            continue
        if action == "X":
            assert tag not in out, keyword_for_tag(tag)
        elif action == "Z":
            expected = PSEUDONYM if int(tag) in profile.pseudonym_tags else None
            value = out[tag].value
            assert (value == expected) if expected else not value, keyword_for_tag(tag)
        elif action == "D" and vr != "SQ":
            assert out[tag].value == profile.dummy_values[vr], keyword_for_tag(tag)
        elif action == "U" and element.value:
            assert out[tag].value == uid_map.mapping[str(element.value)], keyword_for_tag(tag)

    assert out.PatientIdentityRemoved == "YES"
    assert "Basic Application Confidentiality Profile" in out.DeidentificationMethod
    code = out.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert out.SOPClassUID == original.SOPClassUID
    assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID

    # no original instance UID, name or identifier left anywhere in the written file
    written = _bytes(out)
    for uid in _uids(original):
        if not uid.startswith(DICOM_UID_ROOT):
            assert uid.encode() not in written
    kept = {str(original.get("Manufacturer") or "")}  # not identifying, may equal a name
    for keyword in ("PatientName", "PatientID", "InstitutionName", "StationName"):
        value = str(original.get(keyword) or "").strip()
        if len(value) > 3 and not any(value in k for k in kept):
            assert value.encode() not in written, keyword


@pytest.mark.parametrize("name", FILES)
def test_output_writes_and_reads_back(name: str) -> None:
    out = deidentify(
        _read(name), profile=load_profile(), uid_map=UidMap(), pseudonym=PSEUDONYM
    ).dataset
    back = pydicom.dcmread(io.BytesIO(_bytes(out)))
    assert back.SOPInstanceUID == out.SOPInstanceUID
    assert back.PatientName == PSEUDONYM
    assert back.PatientID == PSEUDONYM
    if "PixelData" in out:
        assert back.PixelData == _read(name).PixelData  # pixels untouched


def test_private_attributes_are_removed() -> None:
    original = _read("CT_small.dcm")
    assert any(e.tag.is_private for e in original.iterall())
    out = deidentify(original, profile=load_profile(), uid_map=UidMap(), pseudonym=PSEUDONYM)
    assert not any(e.tag.is_private for e in out.dataset.iterall())


def test_curves_and_overlays_are_removed() -> None:
    ds = _read("MR_small.dcm")
    ds.add_new(Tag(0x6000, 0x0010), "US", 64)
    ds.add_new(Tag(0x6000, 0x3000), "OW", b"\x00\x01" * 8)
    ds.add_new(Tag(0x6000, 0x4000), "LT", "burned name")
    ds.add_new(Tag(0x5000, 0x0005), "US", 2)
    out = deidentify(ds, profile=load_profile(), uid_map=UidMap(), pseudonym=PSEUDONYM).dataset
    assert not [e for e in out if e.tag.group in (0x5000, 0x6000)]


# -- UIDs across a study -----------------------------------------------------------------------


def _study_of_three() -> list[Dataset]:
    """Three instances of one study: two images and a third referencing the first."""
    first = _read("CT_small.dcm")
    second = copy.deepcopy(first)
    second.SOPInstanceUID = "1.2.3.4.5.6.7.8.2"
    second.file_meta.MediaStorageSOPInstanceUID = second.SOPInstanceUID
    third = copy.deepcopy(first)
    third.SOPInstanceUID = "1.2.3.4.5.6.7.8.3"
    third.file_meta.MediaStorageSOPInstanceUID = third.SOPInstanceUID
    reference = Dataset()
    reference.ReferencedSOPClassUID = first.SOPClassUID
    reference.ReferencedSOPInstanceUID = first.SOPInstanceUID
    third.SourceImageSequence = Sequence([reference])
    return [first, second, third]


def test_uids_are_replaced_consistently_across_a_study_and_reverse() -> None:
    profile, uid_map = load_profile(), UidMap()
    instances = _study_of_three()
    results = [
        deidentify(ds, profile=profile, uid_map=uid_map, pseudonym=PSEUDONYM) for ds in instances
    ]
    outs = [r.dataset for r in results]
    assert len({o.StudyInstanceUID for o in outs}) == 1
    assert len({o.SeriesInstanceUID for o in outs}) == 1
    assert len({o.FrameOfReferenceUID for o in outs}) == 1
    assert len({o.SOPInstanceUID for o in outs}) == 3
    new_study = outs[0].StudyInstanceUID
    assert new_study.startswith("2.25.") and new_study != instances[0].StudyInstanceUID
    # the reference from the third instance follows the first instance's new UID
    reference = outs[2].SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == outs[0].SOPInstanceUID
    assert reference.ReferencedSOPClassUID == instances[0].SOPClassUID
    # the mapping undoes it
    reverse = uid_map.reverse()
    for original, out in zip(instances, outs, strict=True):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert reverse[out[keyword].value] == original[keyword].value
    # each instance reports the UIDs it used; one pseudonym for the study's patient
    assert results[2].uids[instances[0].SOPInstanceUID] == outs[0].SOPInstanceUID
    assert {r.patient for r in results} == {results[0].patient}
    assert results[0].patient.pseudonym == PSEUDONYM
    assert PSEUDONYM not in results[0].patient.patient_id_sha256


def test_a_new_map_gives_new_uids() -> None:
    profile = load_profile()
    a = deidentify(_read("MR_small.dcm"), profile=profile, uid_map=UidMap(), pseudonym="A")
    b = deidentify(_read("MR_small.dcm"), profile=profile, uid_map=UidMap(), pseudonym="B")
    assert a.dataset.StudyInstanceUID != b.dataset.StudyInstanceUID


# -- sequences ---------------------------------------------------------------------------------


def test_sequences_are_handled_at_every_level() -> None:
    ds = _read("MR_small.dcm")
    observer = Dataset()
    observer.VerifyingObserverName = "Smith^Jane"
    observer.VerifyingOrganization = "Hospital X"
    observer.VerificationDateTime = "20240101120000"
    code = Dataset()
    code.CodeValue = "EMP-1234"
    code.CodingSchemeDesignator = "L"
    code.CodeMeaning = "Jane Smith"
    observer.VerifyingObserverIdentificationCodeSequence = Sequence([code])
    ds.VerifyingObserverSequence = Sequence([observer])  # D
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = "1.2.3.99"
    ds.ReferencedStudySequence = Sequence([study_ref])  # X/Z on a sequence: emptied
    request = Dataset()
    request.RequestedProcedureID = "RP-1"
    ds.RequestAttributesSequence = Sequence([request])  # X
    nested = Dataset()
    nested.PatientName = "Hidden^Name"
    nested.AccessionNumber = "ACC-42"
    nested.SeriesInstanceUID = "1.2.3.77"
    ds.ReferencedSeriesSequence = Sequence([nested])  # not in the table: cleaned inside
    ds.InstitutionCodeSequence = Sequence([code])  # X/Z/D on a sequence: emptied

    out = deidentify(ds, profile=load_profile(), uid_map=UidMap(), pseudonym=PSEUDONYM).dataset
    item = out.VerifyingObserverSequence[0]
    assert item.VerifyingObserverName == "ANONYMIZED"
    assert "VerifyingOrganization" not in item
    assert item.VerificationDateTime == "19000101000000.000000"
    assert len(item.VerifyingObserverIdentificationCodeSequence) == 0
    assert len(out.ReferencedStudySequence) == 0
    assert "RequestAttributesSequence" not in out
    inner = out.ReferencedSeriesSequence[0]
    assert inner.PatientName == PSEUDONYM
    assert inner.AccessionNumber == ""
    assert inner.SeriesInstanceUID.startswith("2.25.")
    assert len(out.InstitutionCodeSequence) == 0
    written = _bytes(out)
    for text in (b"Smith^Jane", b"Hospital X", b"EMP-1234", b"Hidden^Name", b"ACC-42"):
        assert text not in written


def test_a_d_sequence_replaces_text_it_holds() -> None:
    ds = _read("MR_small.dcm")
    person = Dataset()
    person.CodeValue = "ID-778899"
    person.CodingSchemeDesignator = "L"
    person.CodeMeaning = "Jane Smith"
    ds.PersonIdentificationCodeSequence = Sequence([person])  # D
    out = deidentify(ds, profile=load_profile(), uid_map=UidMap(), pseudonym=PSEUDONYM).dataset
    item = out.PersonIdentificationCodeSequence[0]
    assert item.CodeValue == "ANONYMIZED" and item.CodeMeaning == "ANONYMIZED"


# -- burned-in annotation ----------------------------------------------------------------------


def test_burned_in_annotation_is_refused() -> None:
    ds = _read("MR_small.dcm")
    ds.BurnedInAnnotation = "YES"
    uid_map = UidMap()
    with pytest.raises(BurnedInAnnotation):
        deidentify(ds, profile=load_profile(), uid_map=uid_map, pseudonym=PSEUDONYM)
    assert not uid_map.mapping
    ds.BurnedInAnnotation = "NO"
    out = deidentify(ds, profile=load_profile(), uid_map=uid_map, pseudonym=PSEUDONYM)
    assert out.dataset.BurnedInAnnotation == "NO"


def test_gateway_task_code_is_the_servers() -> None:
    from dicom_gateway.deidentify_task import TASK_CODE_DEIDENTIFY
    from dicom_gateway.tasks import TASK_CODE_SYSTEM
    from fhir_server import codes

    assert (TASK_CODE_SYSTEM, TASK_CODE_DEIDENTIFY) == (
        codes.TASK_CODE_SYSTEM,
        codes.TASK_CODE_DEIDENTIFY_IMAGING,
    )


def test_keyed_uids_and_pseudonyms_repeat_per_request_and_key_only() -> None:
    """A Task worked again (after its gateway died) makes the same copy; another Task, or
    another gateway key, a different one."""
    from dicom_gateway.deidentify import keyed_uid
    from dicom_gateway.deidentify_task import keyed_pseudonym

    key, other_key = b"k" * 32, b"o" * 32
    uid = keyed_uid(key, "task-1", "1.2.3.4")
    assert uid == keyed_uid(key, "task-1", "1.2.3.4")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid[5:].isdigit()
    assert uid != keyed_uid(key, "task-2", "1.2.3.4")
    assert uid != keyed_uid(other_key, "task-1", "1.2.3.4")
    assert uid != keyed_uid(key, "task-1", "1.2.3.5")
    assert keyed_pseudonym(key, "task-1") == keyed_pseudonym(key, "task-1")
    assert keyed_pseudonym(key, "task-1") != keyed_pseudonym(key, "task-2")
    assert keyed_pseudonym(key, "task-1").startswith("MSO-ANON-")
