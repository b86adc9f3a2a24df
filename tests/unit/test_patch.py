"""The patch interaction's pure core: JSON Patch and FHIRPath Patch (fhir_server.fhir.patch)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fhir_server.fhir.outcome import FhirError
from fhir_server.fhir.patch import apply_fhirpath_patch, apply_json_patch, apply_patch

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"versionId": "3"},
    "active": True,
    "identifier": [
        {"system": "urn:mrn", "value": "1"},
        {"system": "urn:ssn", "value": "2"},
    ],
    "name": [
        {"use": "official", "family": "Doe", "given": ["John", "Quincy"]},
        {"use": "nickname", "given": ["Jo"]},
    ],
    "birthDate": "1970-01-01",
    "_birthDate": {"extension": [{"url": "http://example.org/time", "valueTime": "10:00:00"}]},
    "deceasedBoolean": False,
    "extension": [{"url": "http://example.org/ext", "valueString": "x"}],
}

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
    "valueQuantity": {"value": 120, "unit": "mmHg"},
    "component": [
        {"code": {"text": "systolic"}, "valueQuantity": {"value": 120}},
        {"code": {"text": "diastolic"}, "valueQuantity": {"value": 80}},
    ],
}


def raises(status: int, code: str, call: Any, *args: Any) -> FhirError:
    """Call and assert a FhirError with ``status`` and ``code``; return it."""
    with pytest.raises(FhirError) as info:
        call(*args)
    assert (info.value.status, info.value.code) == (status, code), info.value.message
    return info.value


# --------------------------------------------------------------------------------------------
# JSON Patch
# --------------------------------------------------------------------------------------------


def jp(*ops: dict[str, Any], resource: dict[str, Any] | None = None) -> dict[str, Any]:
    return apply_json_patch(resource or PATIENT, list(ops))


def test_json_add_member_and_array_items() -> None:
    out = jp(
        {"op": "add", "path": "/gender", "value": "male"},
        {"op": "add", "path": "/name/-", "value": {"family": "Smith"}},
        {"op": "add", "path": "/identifier/0", "value": {"value": "0"}},
    )
    assert out["gender"] == "male"
    assert out["name"][-1] == {"family": "Smith"}
    assert [i["value"] for i in out["identifier"]] == ["0", "1", "2"]


def test_json_remove() -> None:
    out = jp({"op": "remove", "path": "/name/1"}, {"op": "remove", "path": "/active"})
    assert len(out["name"]) == 1
    assert "active" not in out


def test_json_replace() -> None:
    out = jp({"op": "replace", "path": "/name/0/family", "value": "Roe"})
    assert out["name"][0]["family"] == "Roe"


def test_json_move() -> None:
    out = jp({"op": "move", "from": "/name/0/family", "path": "/name/0/text"})
    assert "family" not in out["name"][0]
    assert out["name"][0]["text"] == "Doe"


def test_json_copy() -> None:
    out = jp({"op": "copy", "from": "/name/0", "path": "/name/-"})
    assert out["name"][2] == PATIENT["name"][0]
    assert out["name"][2] is not out["name"][0]


def test_json_test_passes_then_applies() -> None:
    out = jp(
        {"op": "test", "path": "/status", "value": "final"},
        {"op": "test", "path": "/valueQuantity/value", "value": 120.0},
        {"op": "test", "path": "/component/1", "value": OBSERVATION["component"][1]},
        {"op": "replace", "path": "/status", "value": "amended"},
        resource=OBSERVATION,
    )
    assert out["status"] == "amended"


def test_json_test_failure_is_422() -> None:
    err = raises(
        422,
        "MSO-PATCH-002",
        jp,
        {"op": "replace", "path": "/active", "value": False},
        {"op": "test", "path": "/name/0/family", "value": "Roe"},
    )
    assert err.issue_code == "processing"
    assert err.expression == ["/1", "/name/0/family"]
    assert "operation 1" in err.message
    assert "/name/0/family" in err.message


def test_json_test_compares_types_strictly() -> None:
    raises(422, "MSO-PATCH-002", jp, {"op": "test", "path": "/active", "value": 1})


def test_json_test_on_missing_path_fails() -> None:
    raises(422, "MSO-PATCH-002", jp, {"op": "test", "path": "/gender", "value": "male"})


@pytest.mark.parametrize(
    "body",
    [
        {"op": "add", "path": "/a", "value": 1},
        "[]",
        None,
        [1],
        [{"path": "/active"}],
        [{"op": "frobnicate", "path": "/active"}],
        [{"op": "remove"}],
        [{"op": "remove", "path": 3}],
        [{"op": "add", "path": "/gender"}],
        [{"op": "replace", "path": "/gender"}],
        [{"op": "test", "path": "/gender"}],
        [{"op": "move", "path": "/gender"}],
        [{"op": "copy", "path": "/gender", "from": 1}],
    ],
)
def test_json_malformed_body_is_400(body: Any) -> None:
    err = raises(400, "MSO-PATCH-001", apply_json_patch, PATIENT, body)
    assert err.issue_code == "invalid"


def test_json_malformed_operation_names_its_index() -> None:
    body = [{"op": "remove", "path": "/active"}, {"op": "add", "path": "/gender"}]
    err = raises(400, "MSO-PATCH-001", apply_json_patch, PATIENT, body)
    assert err.expression == ["/1", "/gender"]


@pytest.mark.parametrize(
    "op",
    [
        {"op": "remove", "path": "/gender"},
        {"op": "replace", "path": "/gender", "value": "male"},
        {"op": "replace", "path": "/name/7/family", "value": "X"},
        {"op": "add", "path": "/name/9", "value": {}},
        {"op": "add", "path": "/nothing/here", "value": 1},
        {"op": "replace", "path": "name", "value": []},
        {"op": "remove", "path": "/name/one"},
        {"op": "move", "from": "/gender", "path": "/text"},
        {"op": "copy", "from": "/nothing", "path": "/text"},
    ],
)
def test_json_bad_path_is_422(op: dict[str, Any]) -> None:
    err = raises(422, "MSO-PATCH-003", jp, op)
    assert err.expression == ["/0", op["path"]]
    assert "operation 0" in err.message


@pytest.mark.parametrize(
    "op",
    [
        {"op": "replace", "path": "/id", "value": "p2"},
        {"op": "remove", "path": "/id"},
        {"op": "replace", "path": "/resourceType", "value": "Group"},
        {"op": "move", "from": "/id", "path": "/text"},
        {"op": "replace", "path": "", "value": {"resourceType": "Patient", "id": "other"}},
        {"op": "replace", "path": "", "value": []},
    ],
)
def test_json_changing_resource_type_or_id_is_422(op: dict[str, Any]) -> None:
    err = raises(422, "MSO-PATCH-004", jp, op)
    assert err.issue_code == "invariant"
    assert err.expression == ["/0", op["path"]]


def test_json_id_may_be_rewritten_to_the_same_value() -> None:
    out = jp({"op": "replace", "path": "/id", "value": "p1"})
    assert out["id"] == "p1"


def test_json_add_id_to_resource_without_one_is_422() -> None:
    op = {"op": "add", "path": "/id", "value": "x"}
    raises(422, "MSO-PATCH-004", apply_json_patch, {"resourceType": "Basic"}, [op])


def test_json_error_diagnostics_stay_short() -> None:
    big = {**PATIENT, "text": {"status": "generated", "div": "<div>" + "x" * 5000 + "</div>"}}
    with pytest.raises(FhirError) as info:
        apply_json_patch(big, [{"op": "remove", "path": "/nothing/here"}])
    assert len(info.value.message) < 400


def test_json_input_never_mutated_and_values_not_aliased() -> None:
    before = copy.deepcopy(PATIENT)
    value = {"family": "Smith", "given": ["A"]}
    ops = [
        {"op": "add", "path": "/name/-", "value": value},
        {"op": "remove", "path": "/identifier/0"},
        {"op": "replace", "path": "/name/0/given/0", "value": "J"},
    ]
    ops_before = copy.deepcopy(ops)
    out = apply_json_patch(PATIENT, ops)
    assert before == PATIENT
    assert ops == ops_before
    out["name"][-1]["given"].append("B")
    assert value == {"family": "Smith", "given": ["A"]}
    # A failing patch leaves the input untouched too.
    raises(
        422,
        "MSO-PATCH-003",
        apply_json_patch,
        PATIENT,
        [{"op": "remove", "path": "/active"}, {"op": "remove", "path": "/gender"}],
    )
    assert before == PATIENT


# --------------------------------------------------------------------------------------------
# FHIRPath Patch
# --------------------------------------------------------------------------------------------


def op(type_: str, path: str, /, **parts: Any) -> dict[str, Any]:
    """One ``operation`` parameter; keyword values are part bodies (without the name)."""
    out = [{"name": "type", "valueCode": type_}, {"name": "path", "valueString": path}]
    out += [{"name": name, **body} for name, body in parts.items()]
    return {"name": "operation", "part": out}


def params(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(ops)}


def fp(*ops: dict[str, Any], resource: dict[str, Any] | None = None) -> dict[str, Any]:
    return apply_fhirpath_patch(resource or PATIENT, params(*ops))


def fp_error(status: int, code: str, *ops: dict[str, Any], resource: Any = None) -> FhirError:
    return raises(status, code, apply_fhirpath_patch, resource or PATIENT, params(*ops))


def integer(n: Any) -> dict[str, Any]:
    return {"valueInteger": n}


# add -------------------------------------------------------------------------------------------


def test_fp_add_primitive() -> None:
    out = fp(op("add", "Patient", name={"valueString": "gender"}, value={"valueCode": "male"}))
    assert out["gender"] == "male"


def test_fp_add_appends_to_repeating_element() -> None:
    coding = {"system": "http://snomed.info/sct", "code": "271649006"}
    out = fp(
        op(
            "add", "Observation.code", name={"valueString": "coding"}, value={"valueCoding": coding}
        ),
        resource=OBSERVATION,
    )
    assert out["code"]["coding"] == [*OBSERVATION["code"]["coding"], coding]


def test_fp_add_creates_missing_list() -> None:
    out = fp(
        op(
            "add",
            "Patient",
            name={"valueString": "telecom"},
            value={"valueContactPoint": {"system": "phone", "value": "555"}},
        )
    )
    assert out["telecom"] == [{"system": "phone", "value": "555"}]


def test_fp_add_primitive_to_list_selected_by_where() -> None:
    out = fp(
        op(
            "add",
            "Patient.name.where(use = 'nickname')",
            name={"valueString": "given"},
            value={"valueString": "Johnny"},
        )
    )
    assert out["name"][1]["given"] == ["Jo", "Johnny"]


def test_fp_add_complex_value_from_nested_parts() -> None:
    contact = {
        "name": "value",
        "part": [
            {"name": "relationship", "valueCodeableConcept": {"text": "mother"}},
            {"name": "name", "valueHumanName": {"family": "Doe"}},
            {"name": "telecom", "valueContactPoint": {"system": "phone", "value": "1"}},
            {"name": "gender", "valueCode": "female"},
            {"name": "period", "part": [{"name": "start", "valueDateTime": "2020-01-01"}]},
        ],
    }
    out = fp(op("add", "Patient", name={"valueString": "contact"}, value=contact))
    assert out["contact"] == [
        {
            # relationship and telecom repeat, so a single part still becomes an array
            "relationship": [{"text": "mother"}],
            "name": {"family": "Doe"},
            "telecom": [{"system": "phone", "value": "1"}],
            "gender": "female",
            "period": {"start": "2020-01-01"},
        }
    ]


def test_fp_add_extension_from_parts_names_choice_by_type() -> None:
    value = {
        "name": "value",
        "part": [
            {"name": "url", "valueUri": "http://example.org/other"},
            {"name": "value", "valueBoolean": True},
        ],
    }
    out = fp(op("add", "Patient", name={"valueString": "extension"}, value=value))
    assert out["extension"][-1] == {"url": "http://example.org/other", "valueBoolean": True}


def test_fp_add_choice_element_takes_its_type_suffix() -> None:
    resource = {k: v for k, v in PATIENT.items() if k != "deceasedBoolean"}
    out = fp(
        op("add", "Patient", name={"valueString": "deceased"}, value={"valueDateTime": "2024"}),
        resource=resource,
    )
    assert out["deceasedDateTime"] == "2024"


def test_fp_add_backbone_component() -> None:
    value = {
        "name": "value",
        "part": [
            {"name": "code", "valueCodeableConcept": {"text": "mean"}},
            {"name": "value", "valueQuantity": {"value": 93}},
        ],
    }
    out = fp(
        op("add", "Observation", name={"valueString": "component"}, value=value),
        resource=OBSERVATION,
    )
    assert out["component"][-1] == {"code": {"text": "mean"}, "valueQuantity": {"value": 93}}


def test_fp_add_contained_resource() -> None:
    org = {"resourceType": "Organization", "id": "org", "name": "Clinic"}
    out = fp(op("add", "Patient", name={"valueString": "contained"}, value={"resource": org}))
    assert out["contained"] == [org]


def test_fp_add_primitive_with_extension() -> None:
    ext = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}
    out = fp(
        op(
            "add",
            "Patient.name[1]",
            name={"valueString": "given"},
            value={"valueString": "Jon", "_valueString": ext},
        )
    )
    assert out["name"][1]["given"] == ["Jo", "Jon"]
    assert out["name"][1]["_given"] == [None, ext]


@pytest.mark.parametrize(
    ("path", "name", "value"),
    [
        ("Patient", "active", {"valueBoolean": False}),  # already set, not repeating
        ("Patient", "deceased", {"valueDateTime": "2024"}),  # deceasedBoolean already set
        ("Patient", "nonsense", {"valueString": "x"}),  # no such element
        ("Patient", "deceased", {"valueString": "x"}),  # not an allowed type
        ("Patient.birthDate", "id", {"valueString": "x"}),  # a primitive has no children here
        ("Patient", "maritalStatus", {"valueString": "M"}),  # complex element, primitive value
        ("Patient", "gender", {"valueCoding": {"code": "male"}}),  # primitive, complex value
        ("Patient", "contained", {"valueString": "x"}),  # needs a resource
    ],
)
def test_fp_add_to_unsuitable_element_is_422(path: str, name: str, value: Any) -> None:
    fp_error(422, "MSO-PATCH-015", op("add", path, name={"valueString": name}, value=value))


# insert ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "expected"), [(0, ["0", "1", "2"]), (1, ["1", "0", "2"]), (2, ["1", "2", "0"])]
)
def test_fp_insert_at_index(index: int, expected: list[str]) -> None:
    value = {"valueIdentifier": {"system": "urn:new", "value": "0"}}
    out = fp(op("insert", "Patient.identifier", index=integer(index), value=value))
    assert [i["value"] for i in out["identifier"]] == expected


def test_fp_insert_into_missing_list() -> None:
    value = {"valueContactPoint": {"system": "email", "value": "a@b"}}
    out = fp(op("insert", "Patient.telecom", index=integer(0), value=value))
    assert out["telecom"] == [{"system": "email", "value": "a@b"}]


def test_fp_insert_primitive_keeps_extension_array_aligned() -> None:
    resource = copy.deepcopy(PATIENT)
    resource["name"][0]["_given"] = [None, {"id": "q"}]
    out = fp(
        op(
            "insert",
            "Patient.name.where(use='official').given",
            index=integer(1),
            value={"valueString": "Adams"},
        ),
        resource=resource,
    )
    assert out["name"][0]["given"] == ["John", "Adams", "Quincy"]
    assert out["name"][0]["_given"] == [None, None, {"id": "q"}]


def test_fp_insert_complex_value_from_parts() -> None:
    value = {
        "name": "value",
        "part": [{"name": "system", "valueUri": "urn:x"}, {"name": "value", "valueString": "9"}],
    }
    out = fp(op("insert", "Patient.identifier", index=integer(1), value=value))
    assert out["identifier"][1] == {"system": "urn:x", "value": "9"}


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_fp_insert_bad_index_is_422(index: int) -> None:
    value = {"valueIdentifier": {"value": "0"}}
    err = fp_error(
        422, "MSO-PATCH-013", op("insert", "Patient.identifier", index=integer(index), value=value)
    )
    assert err.expression == ["Parameters.parameter[0]", "Patient.identifier"]


def test_fp_insert_into_non_list_is_422() -> None:
    fp_error(
        422,
        "MSO-PATCH-015",
        op("insert", "Patient.birthDate", index=integer(0), value={"valueDate": "2000"}),
    )


def test_fp_insert_with_ambiguous_parent_is_422() -> None:
    # Patient.name.given: two names, so which given list is meant is ambiguous.
    fp_error(
        422,
        "MSO-PATCH-012",
        op("insert", "Patient.name.given", index=integer(0), value={"valueString": "X"}),
    )


# delete ----------------------------------------------------------------------------------------


def test_fp_delete_primitive_with_its_extension() -> None:
    out = fp(op("delete", "Patient.birthDate"))
    assert "birthDate" not in out
    assert "_birthDate" not in out


def test_fp_delete_list_item_selected_by_where() -> None:
    out = fp(op("delete", "Patient.identifier.where(system = 'urn:mrn')"))
    assert out["identifier"] == [{"system": "urn:ssn", "value": "2"}]


def test_fp_delete_primitive_list_item() -> None:
    out = fp(op("delete", "Patient.name[0].given[0]"))
    assert out["name"][0]["given"] == ["Quincy"]


def test_fp_delete_last_item_removes_the_array() -> None:
    out = fp(op("delete", "Patient.extension('http://example.org/ext')"))
    assert "extension" not in out


def test_fp_delete_prunes_objects_left_empty() -> None:
    out = fp(op("delete", "Patient.meta.versionId"))
    assert "meta" not in out


def test_fp_delete_of_nothing_is_a_no_op() -> None:
    assert fp(op("delete", "Patient.gender")) == PATIENT
    assert fp(op("delete", "Patient.identifier.where(system='urn:none')")) == PATIENT


def test_fp_delete_of_several_is_422() -> None:
    err = fp_error(422, "MSO-PATCH-012", op("delete", "Patient.identifier"))
    assert "2 elements" in err.message


def test_fp_delete_of_id_or_resource_fails() -> None:
    fp_error(422, "MSO-PATCH-004", op("delete", "Patient.id"))
    fp_error(422, "MSO-PATCH-015", op("delete", "Patient"))


# replace ---------------------------------------------------------------------------------------


def test_fp_replace_primitive() -> None:
    out = fp(
        op("replace", "Patient.name.where(use='official').family", value={"valueString": "Roe"})
    )
    assert out["name"][0]["family"] == "Roe"
    assert out["name"][1] == PATIENT["name"][1]


def test_fp_replace_primitive_drops_old_extension_unless_given() -> None:
    out = fp(op("replace", "Patient.birthDate", value={"valueDate": "1971-02-03"}))
    assert out["birthDate"] == "1971-02-03"
    assert "_birthDate" not in out
    ext = {"extension": [{"url": "http://example.org/y", "valueBoolean": True}]}
    out = fp(op("replace", "Patient.birthDate", value={"valueDate": "1972", "_valueDate": ext}))
    assert out["_birthDate"] == ext


def test_fp_replace_list_item_with_complex_value() -> None:
    coding = {"system": "http://snomed.info/sct", "code": "1"}
    out = fp(
        op("replace", "Observation.code.coding.first()", value={"valueCoding": coding}),
        resource=OBSERVATION,
    )
    assert out["code"]["coding"] == [coding]


def test_fp_replace_with_nested_parts() -> None:
    value = {
        "name": "value",
        "part": [{"name": "system", "valueUri": "urn:mrn"}, {"name": "value", "valueString": "77"}],
    }
    out = fp(op("replace", "Patient.identifier[0]", value=value))
    assert out["identifier"][0] == {"system": "urn:mrn", "value": "77"}


def test_fp_replace_choice_with_another_type() -> None:
    out = fp(op("replace", "Patient.deceased", value={"valueDateTime": "2020-05-01"}))
    assert out["deceasedDateTime"] == "2020-05-01"
    assert "deceasedBoolean" not in out


def test_fp_replace_choice_of_backbone_with_where_on_choice() -> None:
    out = fp(
        op(
            "replace",
            "Observation.component.where(value.value = 80).value",
            value={"valueQuantity": {"value": 85, "unit": "mmHg"}},
        ),
        resource=OBSERVATION,
    )
    assert out["component"][1]["valueQuantity"] == {"value": 85, "unit": "mmHg"}


def test_fp_replace_via_of_type() -> None:
    out = fp(
        op("replace", "Observation.value.ofType(Quantity).value", value={"valueDecimal": 121}),
        resource=OBSERVATION,
    )
    assert out["valueQuantity"]["value"] == 121


def test_fp_replace_of_nothing_or_several_is_422() -> None:
    fp_error(422, "MSO-PATCH-012", op("replace", "Patient.gender", value={"valueCode": "male"}))
    fp_error(422, "MSO-PATCH-012", op("replace", "Patient.name.given", value={"valueString": "X"}))


def test_fp_replace_id_or_resource_type_is_422() -> None:
    err = fp_error(422, "MSO-PATCH-004", op("replace", "Patient.id", value={"valueId": "p2"}))
    assert err.issue_code == "invariant"
    assert err.expression == ["Parameters.parameter[0]", "Patient.id"]
    fp_error(422, "MSO-PATCH-004", op("replace", "resourceType", value={"valueCode": "Group"}))
    assert fp(op("replace", "Patient.id", value={"valueId": "p1"}))["id"] == "p1"


def test_fp_replace_with_wrong_kind_of_value_is_422() -> None:
    fp_error(422, "MSO-PATCH-015", op("replace", "Patient.birthDate", value={"valueCoding": {}}))
    fp_error(
        422, "MSO-PATCH-015", op("replace", "Patient.identifier[0]", value={"valueString": "1"})
    )
    fp_error(422, "MSO-PATCH-015", op("replace", "Patient", value={"resource": PATIENT}))


# move ------------------------------------------------------------------------------------------


def test_fp_move_list_item() -> None:
    resource = copy.deepcopy(PATIENT)
    resource["identifier"].append({"system": "urn:x", "value": "3"})
    out = fp(
        op("move", "Patient.identifier", source=integer(0), destination=integer(2)),
        resource=resource,
    )
    assert [i["value"] for i in out["identifier"]] == ["2", "3", "1"]
    out = fp(
        op("move", "Patient.identifier", source=integer(2), destination=integer(0)),
        resource=resource,
    )
    assert [i["value"] for i in out["identifier"]] == ["3", "1", "2"]


def test_fp_move_primitive_keeps_extension_array_aligned() -> None:
    resource = copy.deepcopy(PATIENT)
    resource["name"][0]["_given"] = [{"id": "j"}, None]
    out = fp(
        op("move", "Patient.name[0].given", source=integer(1), destination=integer(0)),
        resource=resource,
    )
    assert out["name"][0]["given"] == ["Quincy", "John"]
    assert out["name"][0]["_given"] == [None, {"id": "j"}]


@pytest.mark.parametrize(("source", "destination"), [(2, 0), (0, 2), (-1, 0), (0, -1)])
def test_fp_move_bad_index_is_422(source: int, destination: int) -> None:
    fp_error(
        422,
        "MSO-PATCH-013",
        op("move", "Patient.identifier", source=integer(source), destination=integer(destination)),
    )


def test_fp_move_in_empty_list_is_422() -> None:
    fp_error(
        422,
        "MSO-PATCH-013",
        op("move", "Patient.telecom", source=integer(0), destination=integer(0)),
    )


def test_fp_move_on_non_list_is_422() -> None:
    fp_error(
        422,
        "MSO-PATCH-015",
        op("move", "Patient.active", source=integer(0), destination=integer(0)),
    )


# paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("Patient.name.first().family", "Doe"),
        ("name[0].family", "Doe"),
        ("Patient.name.given[1]", "Quincy"),
        ("Patient.name.given.last()", "Jo"),
        ("Patient.name.given.skip(2)", "Jo"),
        ("Patient.name.given.take(1)", "John"),
        ("Patient.name.tail().given", "Jo"),
        ("Patient.name.given.where($this = 'Quincy')", "Quincy"),
        ("Patient.name.where(given.exists() and family.empty()).given.single()", "Jo"),
        ("Patient.`name`[0].`family`", "Doe"),
        ("Patient.extension('http://example.org/ext').value.ofType(string)", "x"),
        ("Patient.identifier.where(system = %resource.identifier[1].system).value", "2"),
        ("Patient.name.given.where(startsWith('Qu'))", "Quincy"),
    ],
)
def test_fp_supported_path_subset(path: str, expected: str) -> None:
    out = fp(op("replace", path, value={"valueString": "CHANGED"}))
    assert out != PATIENT
    changed = [
        *[g for n in out["name"] for g in n.get("given", [])],
        *[n.get("family") for n in out["name"]],
        *[i["value"] for i in out["identifier"]],
        *[e["valueString"] for e in out["extension"]],
    ]
    original = [
        *[g for n in PATIENT["name"] for g in n.get("given", [])],
        *[n.get("family") for n in PATIENT["name"]],
        *[i["value"] for i in PATIENT["identifier"]],
        *[e["valueString"] for e in PATIENT["extension"]],
    ]
    diff = [(a, b) for a, b in zip(original, changed, strict=True) if a != b]
    assert diff == [(expected, "CHANGED")]


def test_fp_path_for_another_resource_type_matches_nothing() -> None:
    fp_error(422, "MSO-PATCH-012", op("replace", "Observation.status", value={"valueCode": "x"}))


def test_fp_single_over_many_is_422() -> None:
    fp_error(
        422, "MSO-PATCH-012", op("replace", "Patient.name.single()", value={"valueString": "x"})
    )


@pytest.mark.parametrize(
    "path",
    [
        "Patient..name",
        "Patient.name[",
        "Patient.name[x]",
        "Patient.",
        "   ",
        "Patient.name.where(use = 'official'",
        "Patient.name.first(1)",
        "Patient.extension(url)",
        "Patient.name.where()",
        "Patient.name.where(use = )",
        "Patient.name.where(nosuchfunction())",
    ],
)
def test_fp_invalid_path_is_400(path: str) -> None:
    err = fp_error(400, "MSO-PATCH-011", op("replace", path, value={"valueString": "x"}))
    assert err.issue_code == "invalid"


@pytest.mark.parametrize(
    "path",
    ["Patient.name.exists()", "Patient.name | Patient.telecom", "%resource.name", "$this.name"],
)
def test_fp_unsupported_path_is_400(path: str) -> None:
    err = fp_error(400, "MSO-PATCH-014", op("delete", path))
    assert err.issue_code == "not-supported"


# Parameters shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"resourceType": "Patient"},
        {"resourceType": "Parameters", "parameter": {}},
        params({"name": "op", "part": []}),
        params({"name": "operation"}),
        params({"name": "operation", "part": [{"name": "path", "valueString": "Patient"}]}),
        params(op("upsert", "Patient")),
        params(op("delete", "Patient.active", frobnicate={"valueString": "x"})),
        params(op("delete", "Patient.active", path={"valueString": "Patient.id"})),
        params(op("add", "Patient", value={"valueCode": "male"})),
        params(op("add", "Patient", name={"valueString": "gender"})),
        params(op("add", "Patient", name={"valueInteger": 1}, value={"valueCode": "male"})),
        params(op("replace", "Patient.active", value={"valueBoolean": True, "valueString": "x"})),
        params(op("replace", "Patient.active", value={})),
        params(op("replace", "Patient.identifier[0]", value={"part": []})),
        params(op("replace", "Patient.identifier[0]", value={"part": [{"valueString": "x"}]})),
        params(op("replace", "Patient.contained", value={"resource": {"id": "x"}})),
        params(op("insert", "Patient.identifier", value={"valueIdentifier": {}})),
        params(op("insert", "Patient.identifier", index={"valueString": "0"}, value={})),
        params(
            op("insert", "Patient.identifier", index={"valueBoolean": True}, value={"valueId": "x"})
        ),
        params(op("insert", "Patient.identifier", index=integer(0.5), value={"valueId": "x"})),
        params(op("move", "Patient.identifier", source=integer(0))),
        params(
            {
                "name": "operation",
                "part": [{"name": "type", "valueCode": "delete"}, {"name": "path"}],
            }
        ),
    ],
)
def test_fp_malformed_parameters_is_400(body: Any) -> None:
    err = raises(400, "MSO-PATCH-011", apply_fhirpath_patch, PATIENT, body)
    assert err.issue_code == "invalid"


def test_fp_malformed_operation_names_its_index() -> None:
    body = params(op("delete", "Patient.active"), op("insert", "Patient.identifier"))
    err = raises(400, "MSO-PATCH-011", apply_fhirpath_patch, PATIENT, body)
    assert err.expression == ["Parameters.parameter[1]"]
    assert "operation 1" in err.message


def test_fp_errors_name_the_operation_and_path() -> None:
    err = fp_error(
        422,
        "MSO-PATCH-012",
        op("delete", "Patient.active"),
        op("replace", "Patient.gender", value={"valueCode": "male"}),
    )
    assert err.expression == ["Parameters.parameter[1]", "Patient.gender"]
    assert "operation 1" in err.message
    assert "Patient.gender" in err.message


def test_fp_empty_parameters_is_a_no_op() -> None:
    assert apply_fhirpath_patch(PATIENT, {"resourceType": "Parameters"}) == PATIENT


def test_fp_operations_run_in_order() -> None:
    out = fp(
        op("add", "Patient", name={"valueString": "gender"}, value={"valueCode": "male"}),
        op("replace", "Patient.gender", value={"valueCode": "female"}),
        op(
            "insert",
            "Patient.identifier",
            index=integer(2),
            value={"valueIdentifier": {"value": "3"}},
        ),
        op("move", "Patient.identifier", source=integer(2), destination=integer(0)),
        op("delete", "Patient.identifier.where(value = '2')"),
    )
    assert out["gender"] == "female"
    assert [i["value"] for i in out["identifier"]] == ["3", "1"]


def test_fp_input_never_mutated_and_values_not_aliased() -> None:
    before = copy.deepcopy(PATIENT)
    coding = {"system": "urn:s", "code": "M"}
    body = params(
        op(
            "add",
            "Patient",
            name={"valueString": "maritalStatus"},
            value={"valueCodeableConcept": {"coding": [coding]}},
        ),
        op("delete", "Patient.identifier[0]"),
        op("replace", "Patient.name[0].given[0]", value={"valueString": "J"}),
        op("move", "Patient.name", source=integer(0), destination=integer(1)),
        op("replace", "Patient.deceased", value={"valueDateTime": "2020"}),
    )
    body_before = copy.deepcopy(body)
    out = apply_fhirpath_patch(PATIENT, body)
    assert before == PATIENT
    assert body == body_before
    out["maritalStatus"]["coding"][0]["code"] = "S"
    assert coding["code"] == "M"
    fp_error(422, "MSO-PATCH-012", op("delete", "Patient.active"), op("delete", "Patient.name"))
    assert before == PATIENT


# --------------------------------------------------------------------------------------------
# Dispatch on the media type
# --------------------------------------------------------------------------------------------


def test_dispatch_json_patch() -> None:
    body = [{"op": "remove", "path": "/active"}]
    assert "active" not in apply_patch(PATIENT, body, "application/json-patch+json")
    assert "active" not in apply_patch(PATIENT, body, "Application/JSON-Patch+JSON; charset=utf-8")
    raw = b'[{"op": "remove", "path": "/active"}]'
    assert "active" not in apply_patch(PATIENT, raw, "application/json-patch+json")


def test_dispatch_fhirpath_patch() -> None:
    body = params(op("delete", "Patient.active"))
    assert "active" not in apply_patch(PATIENT, body, "application/fhir+json")
    assert "active" not in apply_patch(PATIENT, body, "application/fhir+json; fhirVersion=4.0")
    assert "active" not in apply_patch(PATIENT, body, "application/json")


def test_dispatch_fhir_json_requires_parameters() -> None:
    raises(400, "MSO-PATCH-011", apply_patch, PATIENT, [], "application/fhir+json")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ([{"op": "remove", "path": "/active"}], "application/json"),
        ({"resourceType": "Patient"}, "application/json"),
        ("<Parameters/>", "application/fhir+xml"),
        ("<diff/>", "application/xml-patch+xml"),
        ([], "text/plain"),
        ([], ""),
    ],
)
def test_dispatch_unsupported_media_type_is_415(body: Any, content_type: str) -> None:
    err = raises(415, "MSO-PATCH-415", apply_patch, PATIENT, body, content_type)
    assert err.issue_code == "not-supported"


# --------------------------------------------------------------------------------------------
# Error texts never carry resource content (issue 14)
# --------------------------------------------------------------------------------------------

SECRET = "Quorblewitz"
SECRET_PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p9",
    "name": [{"family": SECRET, "given": [SECRET + "-given"]}],
    "birthDate": "1961-02-03",
}


@pytest.mark.parametrize(
    ("op", "code"),
    [
        ({"op": "remove", "path": "/nothing/here"}, "MSO-PATCH-003"),
        ({"op": "remove", "path": "/name/one"}, "MSO-PATCH-003"),
        ({"op": "replace", "path": "/name/7/family", "value": "X"}, "MSO-PATCH-003"),
        ({"op": "add", "path": "name", "value": 1}, "MSO-PATCH-003"),
        ({"op": "move", "from": "/name", "path": "/name/0/x"}, "MSO-PATCH-003"),
        ({"op": "copy", "from": "/nothing", "path": "/text"}, "MSO-PATCH-003"),
        ({"op": "test", "path": "/name/0/family", "value": "Other"}, "MSO-PATCH-002"),
        ({"op": "test", "path": "/birthDate", "value": "2000-01-01"}, "MSO-PATCH-002"),
        ({"op": "test", "path": "/name/0", "value": {"family": "x"}}, "MSO-PATCH-002"),
        ({"op": {"v": SECRET}, "path": "/name"}, "MSO-PATCH-001"),
    ],
)
def test_json_patch_errors_name_index_op_path_never_content(op: dict[str, Any], code: str) -> None:
    err = raises(
        400 if code == "MSO-PATCH-001" else 422, code, apply_json_patch, SECRET_PATIENT, [op]
    )
    text = err.message + repr(err.to_outcome())
    for secret in (SECRET, "1961-02-03", "2000-01-01", "Other"):
        assert secret not in text
    assert "operation 0" in err.message
    assert (
        err.__cause__ is None
    )  # the library's exception (its text quotes the document) is dropped
    if isinstance(op.get("op"), str):
        assert op["op"] in err.message and op["path"] in err.message


@pytest.mark.parametrize(
    "parts",
    [
        [
            {"name": "type", "valueCode": "replace"},
            {"name": "path", "valueString": "Patient.name.where(family.foo(1))"},
            {"name": "value", "valueString": "x"},
        ],
        [
            {"name": "type", "valueCode": SECRET + " with spaces"},
            {"name": "path", "valueString": "Patient.name"},
        ],
        [{"name": "type", "valueCode": "delete"}, SECRET],
        [
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "birthDate"},
            {"name": "value", "valueDate": "2000-01-01"},
        ],
    ],
)
def test_fhirpath_patch_errors_never_carry_content(parts: list[Any]) -> None:
    body = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": parts}]}
    with pytest.raises(FhirError) as info:
        apply_fhirpath_patch(SECRET_PATIENT, body)
    text = info.value.message + repr(info.value.to_outcome())
    for secret in (SECRET, "1961-02-03", "2000-01-01"):
        assert secret not in text
