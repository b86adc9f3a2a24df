"""The DICOMweb bridge's pure parts: URL rebasing in DICOM JSON (PS3.18 F.2), path parsing
(PS3.18 10.4-10.6 resources) and the narrowing and paging of restricted QIDO-RS searches."""

from __future__ import annotations

import pytest

from fhir_server.dicomweb.paths import Kind, parse
from fhir_server.dicomweb.qido import merge_page, restrict
from fhir_server.dicomweb.rewrite import rebase_urls
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.capabilities import dicomweb_url

ORTHANC = "http://127.0.0.1:8042/dicom-web"
BRIDGE = "https://mso.example/dicomweb"


def test_bulk_data_and_retrieve_urls_point_at_the_bridge_nested_ones_too() -> None:
    study = f"{ORTHANC}/studies/1.2"
    dataset = {
        "00081190": {"vr": "UR", "Value": [study]},
        "7FE00010": {"vr": "OW", "BulkDataURI": f"{study}/series/3/instances/4/bulk/7fe00010"},
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081190": {"vr": "UR", "Value": [f"{study}/series/3/instances/4"]}}],
        },
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "http://127.0.0.1:8042/dicom-web"}]},
        "00081191": {"vr": "UR", "Value": ["https://elsewhere.example/report"]},
    }
    assert rebase_urls([dataset], "/dicom-web", BRIDGE + "/") == 3
    assert dataset["00081190"]["Value"] == [f"{BRIDGE}/studies/1.2"]
    assert dataset["7FE00010"]["BulkDataURI"] == (
        f"{BRIDGE}/studies/1.2/series/3/instances/4/bulk/7fe00010"
    )
    nested = dataset["00081199"]["Value"][0]["00081190"]["Value"]
    assert nested == [f"{BRIDGE}/studies/1.2/series/3/instances/4"]
    # a name is not a URL; a URL outside Orthanc's DICOMweb root is left as it is
    assert dataset["00100010"]["Value"] == [{"Alphabetic": "http://127.0.0.1:8042/dicom-web"}]
    assert dataset["00081191"]["Value"] == ["https://elsewhere.example/report"]


def test_whatever_host_orthanc_wrote_the_path_decides() -> None:
    dataset = {"00081190": {"vr": "UR", "Value": ["http://orthanc:9/dicom-web/studies/1?x=1"]}}
    rebase_urls(dataset, "dicom-web", BRIDGE)
    assert dataset["00081190"]["Value"] == [f"{BRIDGE}/studies/1?x=1"]


@pytest.mark.parametrize(
    ("method", "path", "kind", "level", "uids", "tail"),
    [
        ("GET", "studies", Kind.QUERY, "studies", (None, None, None), ()),
        ("GET", "series", Kind.QUERY, "series", (None, None, None), ()),
        ("GET", "instances", Kind.QUERY, "instances", (None, None, None), ()),
        ("GET", "studies/1.2/series", Kind.QUERY, "series", ("1.2", None, None), ()),
        ("GET", "studies/1.2/instances", Kind.QUERY, "instances", ("1.2", None, None), ()),
        ("GET", "studies/1.2/series/3/instances", Kind.QUERY, "instances", ("1.2", "3", None), ()),
        ("GET", "studies/1.2", Kind.RETRIEVE, None, ("1.2", None, None), ()),
        ("GET", "studies/1.2/metadata", Kind.RETRIEVE, None, ("1.2", None, None), ("metadata",)),
        ("GET", "studies/1.2/series/3/metadata", Kind.RETRIEVE, None, ("1.2", "3", None),
         ("metadata",)),
        ("GET", "studies/1/series/3/instances/4/frames/1,2", Kind.RETRIEVE, None, ("1", "3", "4"),
         ("frames", "1,2")),
        ("GET", "studies/1/series/3/instances/4/rendered", Kind.RETRIEVE, None, ("1", "3", "4"),
         ("rendered",)),
        ("GET", "studies/1/series/3/instances/4/bulk/7fe00010", Kind.RETRIEVE, None,
         ("1", "3", "4"), ("bulk", "7fe00010")),
        ("POST", "studies", Kind.STORE, None, (None, None, None), ()),
        ("POST", "studies/1.2", Kind.STORE, None, ("1.2", None, None), ()),
    ],
)  # fmt: skip
def test_paths(method, path, kind, level, uids, tail) -> None:
    target = parse(method, path)
    assert (target.kind, target.level) == (kind, level)
    assert (target.study, target.series, target.instance) == uids
    assert target.tail == tail
    assert target.path == "/" + path


def test_only_series_metadata_is_cached() -> None:
    assert parse("GET", "studies/1/series/2/metadata").is_series_metadata
    assert not parse("GET", "studies/1/metadata").is_series_metadata
    assert not parse("GET", "studies/1/series/2/instances/3/metadata").is_series_metadata


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "", 404),
        ("GET", "patients", 404),
        ("GET", "studies/not-a-uid", 404),
        ("GET", "studies/1.2/series/x/metadata", 404),
        ("GET", "studies/1.2/whatever", 404),
        ("GET", "studies/" + "1" * 65, 404),
        ("POST", "series", 405),
        ("POST", "studies/1/series/2", 405),
    ],
)
def test_bad_paths(method: str, path: str, status: int) -> None:
    with pytest.raises(FhirError) as caught:
        parse(method, path)
    assert caught.value.status == status


def test_restricted_query_keeps_only_visible_uids_and_pages_itself() -> None:
    params = [("PatientID", "X"), ("StudyInstanceUID", "1,3,9"), ("limit", "1"), ("offset", "1")]
    query = restrict(params, ["1", "2", "3"])
    assert query.uids == ["1", "3"]
    assert (query.offset, query.limit) == (1, 1)
    assert list(query.chunked(1)) == [
        [("PatientID", "X"), ("StudyInstanceUID", "1")],
        [("PatientID", "X"), ("StudyInstanceUID", "3")],
    ]
    answers = [
        [{"0020000D": {"vr": "UI", "Value": ["3"]}}],
        [{"0020000D": {"vr": "UI", "Value": ["1"]}}],
    ]
    page = merge_page(answers, "studies", query.offset, query.limit)
    assert page == [{"0020000D": {"vr": "UI", "Value": ["3"]}}]


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_bad_paging_is_a_400(value: str) -> None:
    with pytest.raises(FhirError) as caught:
        restrict([("limit", value)], ["1"])
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("base", "bridge"),
    [
        ("https://mso.example/fhir", "https://mso.example/dicomweb"),
        ("http://h:8080/fhir/", "http://h:8080/dicomweb"),
        ("https://mso.example/api/r4", "https://mso.example/dicomweb"),
    ],
)
def test_bridge_url_beside_the_fhir_base(base: str, bridge: str) -> None:
    assert dicomweb_url(base) == bridge
