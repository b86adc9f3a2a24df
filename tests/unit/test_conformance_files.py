"""The MSO conformance files (``profiles/``, ``terminology/``): valid R4, consistent, and in step
with :mod:`fhir_server.codes`."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhirpathpy import evaluate

from fhir_server import __version__, codes
from fhir_server.conformance import (
    ConformanceResource,
    conformance_files,
    conformance_root,
    read_resources,
)
from fhir_server.fhir.definitions import load_json
from fhir_server.fhir.validation import validate_resource, validation_issues

BASE = codes.CANONICAL_BASE + "/"
SD_BASE = "http://hl7.org/fhir/StructureDefinition/"
EXTERNAL_SYSTEMS = {"urn:ietf:bcp:13", codes.SNOMED_SYSTEM}
FILES = conformance_files()


@cache
def resources() -> list[ConformanceResource]:
    return read_resources()


@cache
def by_url() -> dict[str, dict[str, Any]]:
    return {r.url: r.resource for r in resources()}


@cache
def spec_terminology() -> dict[str, dict[str, Any]]:
    bundle = load_json("valuesets.json")
    return {e["resource"]["url"]: e["resource"] for e in bundle["entry"]}


@cache
def elements() -> dict[str, dict[str, Any]]:
    return load_json("elements.json")["types"]


def resolve_valueset(url: str) -> dict[str, Any]:
    found = by_url().get(url) or spec_terminology().get(url)
    assert found is not None and found["resourceType"] == "ValueSet", f"{url} does not resolve"
    return found


def codesystem_codes(system: str) -> dict[str, dict[str, Any]]:
    """code -> concept (nested concepts included) of an MSO CodeSystem."""
    cs = by_url()[system]
    assert cs["resourceType"] == "CodeSystem"
    out: dict[str, dict[str, Any]] = {}

    def walk(concepts: list[dict[str, Any]]) -> None:
        for concept in concepts:
            out[concept["code"]] = concept
            walk(concept.get("concept", []))

    walk(cs["concept"])
    return out


def valueset_codes(url: str) -> set[tuple[str, str]]:
    """(system, code) pairs of an MSO ValueSet (a whole-system include lists every code)."""
    out: set[tuple[str, str]] = set()
    for inc in by_url()[url]["compose"]["include"]:
        system = inc["system"]
        if "concept" in inc:
            out.update((system, c["code"]) for c in inc["concept"])
        else:
            out.update((system, code) for code in codesystem_codes(system))
    return out


def of_type(res_type: str) -> list[dict[str, Any]]:
    return [r.resource for r in resources() if r.res_type == res_type]


# -- the files ----------------------------------------------------------------------------------


def test_files_are_found_in_the_source_tree() -> None:
    root = conformance_root()
    assert (root / "terminology").is_dir() and (root / "profiles" / "search-parameters").is_dir()
    kinds = Counter(r.res_type for r in resources())
    assert kinds["CodeSystem"] >= 10 and kinds["ValueSet"] >= 10
    profiles = [sd for sd in of_type("StructureDefinition") if sd["kind"] == "resource"]
    assert len(profiles) == 6 and kinds["Questionnaire"] == 2
    assert kinds["ConceptMap"] == 1 and kinds["SearchParameter"] >= 3


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_is_valid_fhir_r4(path: Path) -> None:
    raw = path.read_bytes()
    data = orjson.loads(raw)
    assert validation_issues(data) == []
    validate_resource(data)
    assert raw.endswith(b"\n") and b"\n  " in raw, "pretty-printed JSON"
    if data["resourceType"] != "Bundle":
        assert path.name == f"{data['resourceType']}-{data['id']}.json"


def test_every_resource_is_an_active_mso_canonical_of_this_version() -> None:
    for item in resources():
        res = item.resource
        assert item.url.startswith(BASE + item.res_type + "/"), item.url
        assert item.res_id.startswith("mso-"), item.key
        assert res["status"] == "active", item.key
        assert res.get("version") == __version__, item.key
        if "name" in res and item.res_type != "SearchParameter":
            assert re.fullmatch(r"[A-Z][A-Za-z0-9_]{0,254}", res["name"]), item.key


def test_ids_and_urls_are_unique() -> None:
    keys = Counter(r.key for r in resources())
    urls = Counter(r.url for r in resources())
    assert [k for k, n in keys.items() if n > 1] == []
    assert [u for u, n in urls.items() if n > 1] == []


# -- terminology --------------------------------------------------------------------------------


def test_codesystems_are_complete_and_have_their_valueset() -> None:
    for cs in of_type("CodeSystem"):
        assert cs["content"] == "complete" and cs["caseSensitive"] is True
        concepts = codesystem_codes(cs["url"])
        assert len(concepts) == sum(1 for _ in concepts)  # codes unique
        for concept in concepts.values():
            assert concept.get("display") and concept.get("definition"), concept["code"]
            declared = {p["code"] for p in cs.get("property", [])}
            assert {p["code"] for p in concept.get("property", [])} <= declared
        vs = resolve_valueset(cs["valueSet"])
        assert vs["compose"]["include"] == [{"system": cs["url"]}]


def test_valuesets_resolve() -> None:
    for vs in of_type("ValueSet"):
        for inc in vs["compose"]["include"]:
            system = inc["system"]
            if system in EXTERNAL_SYSTEMS:
                continue
            known = codesystem_codes(system)
            for concept in inc.get("concept", []):
                assert concept["code"] in known, (vs["url"], concept["code"])
                assert concept["display"] == known[concept["code"]]["display"]


def test_specialty_conceptmap_targets_the_r4_practice_codes() -> None:
    (cm,) = of_type("ConceptMap")
    assert cm["url"] == codes.SPECIALTY_SNOMED_CONCEPTMAP
    assert cm["sourceCanonical"] == codes.SPECIALTY_VALUESET
    practice = resolve_valueset(cm["targetCanonical"])
    (snomed,) = practice["compose"]["include"]
    displays = {c["code"]: c["display"] for c in snomed["concept"]}
    specialties = codesystem_codes(codes.SPECIALTY_SYSTEM)
    (group,) = cm["group"]
    assert group["source"] == codes.SPECIALTY_SYSTEM and group["target"] == snomed["system"]
    mapped = [e["code"] for e in group["element"]]
    assert len(mapped) == len(set(mapped)) and set(mapped) <= set(specialties)
    for element in group["element"]:
        assert element["display"] == specialties[element["code"]]["display"]
        for target in element["target"]:
            assert displays[target["code"]] == target["display"]


def test_specialties_form_a_hierarchy() -> None:
    cs = by_url()[codes.SPECIALTY_SYSTEM]
    assert cs["hierarchyMeaning"] == "is-a"
    top = {c["code"]: [k["code"] for k in c.get("concept", [])] for c in cs["concept"]}
    assert "cardiology" in top["internal-medicine"]
    assert "medical-oncology" in top["oncology"]


# -- profiles -----------------------------------------------------------------------------------


def _base_element(res_type: str, path: str) -> dict[str, Any]:
    """The elements.json entry of ``path`` (``Type.a.b``), following complex types."""
    groups = elements()
    parts = path.split(".")
    assert parts[0] == res_type
    group = res_type
    spec: dict[str, Any] = {"min": 0, "max": "*"}
    for i, part in enumerate(parts[1:]):
        if i:
            nested = f"{group}.{parts[i]}"
            group = nested if nested in groups else spec.get("ref") or spec["types"][0]
        assert part in groups[group], f"{path}: no element {part} in {group}"
        spec = groups[group][part]
    return spec


def _order_key(res_type: str, path: str) -> tuple[int, ...]:
    groups = elements()
    parts = path.split(".")
    group, spec, key = res_type, None, []
    for i, part in enumerate(parts[1:]):
        if i:
            nested = f"{group}.{parts[i]}"
            group = nested if nested in groups else spec.get("ref") or spec["types"][0]
        key.append(list(groups[group]).index(part))
        spec = groups[group][part]
    return tuple(key)


def _max(value: str) -> float:
    return float("inf") if value == "*" else int(value)


@pytest.mark.parametrize(
    "sd", [r.resource for r in read_resources()
           if r.res_type == "StructureDefinition" and r.resource["kind"] == "resource"],
    ids=lambda sd: sd["id"],
)  # fmt: skip
def test_profile_is_a_correct_constraint(sd: dict[str, Any]) -> None:
    res_type = sd["type"]
    assert sd["kind"] == "resource" and sd["abstract"] is False
    assert sd["derivation"] == "constraint" and sd["fhirVersion"] == "4.0.1"
    assert sd["baseDefinition"] == SD_BASE + res_type
    differential = sd["differential"]["element"]
    ids = [e["id"] for e in differential]
    assert len(ids) == len(set(ids))
    keys = []
    for element in differential:
        path = element["path"]
        assert re.sub(r":[^.]+", "", element["id"]) == path, element["id"]
        if ":" in element["id"].rsplit(".", 1)[-1]:
            assert element["id"].endswith(":" + element["sliceName"])
        keys.append(_order_key(res_type, path))
        if path == res_type:
            continue
        base = _base_element(res_type, path)
        assert element.get("min", base["min"]) >= base["min"], path
        assert _max(element.get("max", base["max"])) <= _max(base["max"]), path
        for type_ref in element.get("type", []):
            assert type_ref["code"] in base["types"], path
            for target in type_ref.get("targetProfile", []):
                if target.startswith(SD_BASE):
                    target_type = target.removeprefix(SD_BASE)
                else:
                    target_type = by_url()[target]["type"]
                assert base.get("targets") is None or target_type in base["targets"], path
        if "binding" in element:
            resolve_valueset(element["binding"]["valueSet"])
        pattern = element.get("patternCodeableConcept")
        if pattern:
            for coding in pattern["coding"]:
                concept = codesystem_codes(coding["system"])[coding["code"]]
                assert coding["display"] == concept["display"]
        for constraint in element.get("constraint", []):
            assert constraint["key"].startswith("mso-")
            assert constraint["severity"] == "error"
    assert keys == sorted(keys), "differential elements follow the base element order"


def test_profiles_point_at_each_other() -> None:
    assert codes.PROFILE_CASE in _targets(codes.PROFILE_CASE_TASK, "Task.focus")
    assert codes.PROFILE_RECOMMENDATION in _targets(codes.PROFILE_CASE_TASK, "Task.output.value[x]")
    assert codes.PROFILE_CASE_TASK in _targets(codes.PROFILE_CASE_ISSUE, "Task.partOf")
    assert codes.PROFILE_CASE in _targets(codes.PROFILE_RECOMMENDATION, "DiagnosticReport.basedOn")
    assert codes.PROFILE_CASE in _targets(codes.PROFILE_CHAT_MESSAGE, "Communication.basedOn")
    assert codes.PROFILE_CASE_DOCUMENT in _targets(
        codes.PROFILE_CASE, "ServiceRequest.supportingInfo"
    )


def _targets(profile: str, element_id: str) -> list[str]:
    element = _element(profile, element_id)
    return [t for ref in element["type"] for t in ref.get("targetProfile", [])]


def _element(profile: str, element_id: str) -> dict[str, Any]:
    sd = by_url()[profile]
    return next(e for e in sd["differential"]["element"] if e["id"] == element_id)


# -- invariants, on example instances -----------------------------------------------------------


def _invariant(profile: str, element_id: str, key: str) -> str:
    element = _element(profile, element_id)
    return next(c["expression"] for c in element["constraint"] if c["key"] == key)


def _holds(resource: dict[str, Any], expression: str) -> bool:
    return evaluate(resource, expression) == [True]


def _task(system: str, business: str, status: str, **extra: Any) -> dict[str, Any]:
    task = {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "businessStatus": codes.concept(system, business),
        **extra,
    }
    validate_resource(task)
    return task


def test_case_number_invariant() -> None:
    expression = _invariant(
        codes.PROFILE_CASE, "ServiceRequest.identifier:caseNumber", "mso-case-1"
    )
    match = re.search(r"matches\('(.+)'\)", expression)
    assert match is not None and match.group(1) == codes.CASE_NUMBER_PATTERN.pattern
    fixed = _element(codes.PROFILE_CASE, "ServiceRequest.identifier:caseNumber.system")
    assert fixed["fixedUri"] == codes.CASE_NUMBER_SYSTEM
    for value, ok in [("CASE-004217", True), ("CASE-7KQ2ZX", True), ("CASE-12", False)]:
        identifier = {"system": codes.CASE_NUMBER_SYSTEM, "value": value}
        assert _holds(identifier, expression) is ok, value
        assert bool(codes.CASE_NUMBER_PATTERN.match(value)) is ok


def test_case_task_status_invariants() -> None:
    agree = _invariant(codes.PROFILE_CASE_TASK, "Task", "mso-task-1")
    reason = _invariant(codes.PROFILE_CASE_TASK, "Task", "mso-task-2")
    system = codes.CASE_STATUS_SYSTEM
    for status, task_status in codes.TASK_STATUS_OF_CASE_STATUS.items():
        extra = {"statusReason": {"text": "outside my field"}}
        assert _holds(_task(system, status, task_status, **extra), agree), status
        wrong = "completed" if task_status != "completed" else "in-progress"
        assert not _holds(_task(system, status, wrong, **extra), agree), status
    assert not _holds(_task(system, "rejected", "rejected"), reason)
    assert _holds(_task(system, "accepted", "accepted"), reason)


def test_case_issue_status_invariant() -> None:
    agree = _invariant(codes.PROFILE_CASE_ISSUE, "Task", "mso-issue-1")
    system = codes.CASE_ISSUE_STATUS_SYSTEM
    for status, task_status in codes.TASK_STATUS_OF_ISSUE_STATUS.items():
        assert _holds(_task(system, status, task_status), agree), status
        assert not _holds(_task(system, status, "in-progress"), agree), status


def test_recommendation_invariant() -> None:
    expression = _invariant(codes.PROFILE_RECOMMENDATION, "DiagnosticReport", "mso-rec-1")
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": codes.concept(codes.REPORT_TYPE_SYSTEM, codes.REPORT_TYPE_RECOMMENDATION),
    }
    validate_resource(report)
    assert not _holds(report, expression)
    assert _holds({**report, "conclusion": "Surgery is not indicated."}, expression)
    assert _holds({**report, "status": "preliminary"}, expression)


# -- questionnaires -----------------------------------------------------------------------------


def test_questionnaires_answer_from_resolvable_valuesets() -> None:
    for q in of_type("Questionnaire"):
        link_ids = [item["linkId"] for item in q["item"]]
        assert len(link_ids) == len(set(link_ids))
        for item in q["item"]:
            if "answerValueSet" in item:
                assert item["type"] == "choice"
                resolve_valueset(item["answerValueSet"])


def test_intake_and_feedback_items() -> None:
    intake = by_url()[codes.INTAKE_QUESTIONNAIRE]
    assert [i["linkId"] for i in intake["item"]] == [m.value for m in codes.IntakeItem]
    required = {i["linkId"] for i in intake["item"] if i.get("required")}
    assert required == {"gender", "disease-type", "first-occurrence"}
    feedback = by_url()[codes.FEEDBACK_QUESTIONNAIRE]
    assert [i["linkId"] for i in feedback["item"]] == [m.value for m in codes.FeedbackItem]
    rating = feedback["item"][0]
    assert rating["required"] is True
    assert [o["valueInteger"] for o in rating["answerOption"]] == list(codes.FEEDBACK_RATINGS)


# -- the constants of fhir_server.codes ------------------------------------------------


def test_every_canonical_constant_names_a_resource() -> None:
    constants = {
        name: value
        for name, value in vars(codes).items()
        if name.isupper() and isinstance(value, str) and value.startswith(BASE)
    }
    assert len(constants) > 20
    not_resources = {"CASE_NUMBER_SYSTEM", "INVOICE_NUMBER_SYSTEM", "USERNAME_SYSTEM"}
    for name, url in constants.items():
        if name not in not_resources:
            assert url in by_url(), name
    for name in [n for n in constants if n.endswith("_SYSTEM") and n not in not_resources]:
        assert by_url()[constants[name]]["resourceType"] == "CodeSystem", name
    for name in [n for n in constants if n.endswith("_VALUESET")]:
        assert by_url()[constants[name]]["resourceType"] == "ValueSet", name
    for name in [n for n in constants if n.startswith("PROFILE_")]:
        assert by_url()[constants[name]]["resourceType"] == "StructureDefinition", name


def test_code_constants_exist_in_their_codesystems() -> None:
    pairs = [
        (codes.TASK_CODE_SYSTEM, codes.TASK_CODE_CASE),
        (codes.TASK_CODE_SYSTEM, codes.TASK_CODE_CASE_ISSUE),
        (codes.TASK_CODE_SYSTEM, codes.TASK_CODE_IMPORT_PRIORS),
        (codes.TASK_CODE_SYSTEM, codes.TASK_CODE_DEIDENTIFY_IMAGING),
        (codes.CASE_CATEGORY_SYSTEM, codes.CASE_CATEGORY_SECOND_OPINION),
        (codes.REPORT_TYPE_SYSTEM, codes.REPORT_TYPE_RECOMMENDATION),
        (codes.COMMUNICATION_CATEGORY_SYSTEM, codes.COMMUNICATION_CHAT),
        (codes.COMMUNICATION_CATEGORY_SYSTEM, codes.COMMUNICATION_NOTIFICATION),
    ]
    for system, code in pairs:
        assert code in codesystem_codes(system), (system, code)
    assert set(codesystem_codes(codes.TASK_CODE_SYSTEM)) == {
        "case",
        "case-issue",
        "import-priors",
        "deidentify-imaging",
    }
    assert set(codesystem_codes(codes.COMMUNICATION_CATEGORY_SYSTEM)) == {"chat", "notification"}


def test_case_statuses_match_the_codesystem() -> None:
    concepts = codesystem_codes(codes.CASE_STATUS_SYSTEM)
    assert list(concepts) == [s.value for s in codes.CaseStatus]
    for status, task_status in codes.TASK_STATUS_OF_CASE_STATUS.items():
        (prop,) = concepts[status]["property"]
        assert prop == {"code": "task-status", "valueCode": task_status}
    task_statuses = {c["code"] for c in spec_terminology()[codes.TASK_STATUS_SYSTEM]["concept"]}
    assert set(codes.TASK_STATUS_OF_CASE_STATUS.values()) <= task_statuses
    active = {code for _, code in valueset_codes(codes.CASE_STATUS_ACTIVE_VALUESET)}
    assert active == set(codes.CaseStatus) - codes.CLOSED_CASE_STATUSES


def test_issue_statuses_match_the_codesystem() -> None:
    concepts = codesystem_codes(codes.CASE_ISSUE_STATUS_SYSTEM)
    assert list(concepts) == [s.value for s in codes.CaseIssueStatus]
    for status, task_status in codes.TASK_STATUS_OF_ISSUE_STATUS.items():
        (prop,) = concepts[status]["property"]
        assert prop == {"code": "task-status", "valueCode": task_status}


def test_document_constants_match_the_files() -> None:
    assert list(codesystem_codes(codes.DOCUMENT_CATEGORY_SYSTEM)) == [
        c.value for c in codes.DocumentCategory
    ]
    media = {code for _, code in valueset_codes(codes.DOCUMENT_CONTENT_TYPE_VALUESET)}
    assert media == codes.DOCUMENT_CONTENT_TYPES
    size = _element(codes.PROFILE_CASE_DOCUMENT, "DocumentReference.content.attachment.size")
    assert size["maxValueUnsignedInt"] == codes.MAX_DOCUMENT_BYTES
    category = _element(codes.PROFILE_CASE_DOCUMENT, "DocumentReference.category")
    assert category["binding"]["valueSet"] == codes.DOCUMENT_CATEGORY_VALUESET


def test_bindings_use_the_constants() -> None:
    business = _element(codes.PROFILE_CASE_TASK, "Task.businessStatus")
    assert business["binding"]["valueSet"] == codes.CASE_STATUS_VALUESET
    issue = _element(codes.PROFILE_CASE_ISSUE, "Task.businessStatus")
    assert issue["binding"]["valueSet"] == codes.CASE_ISSUE_STATUS_VALUESET
    specialty = _element(codes.PROFILE_CASE, "ServiceRequest.code")
    assert specialty["binding"]["valueSet"] == codes.SPECIALTY_VALUESET
    category = _element(codes.PROFILE_CASE, "ServiceRequest.category")
    assert category["patternCodeableConcept"]["coding"][0]["code"] == "second-opinion"


# -- OperationDefinitions ------------------------------------------------------------------------


def test_every_mso_operation_has_its_definition() -> None:
    """Each registered MSO operation names an OperationDefinition in ``profiles/operations``
    whose code, resource types and levels are the registered ones."""
    from fhir_server.interactions.operations.catalog import all_operations

    mso = [op for op in all_operations() if op.definition.startswith(BASE)]
    assert len(mso) >= 11
    for op in mso:
        definition = by_url().get(op.definition)
        assert definition is not None, f"${op.name}: no OperationDefinition {op.definition}"
        assert definition["resourceType"] == "OperationDefinition"
        assert definition["code"] == op.name
        assert definition["instance"] == ("instance" in op.levels)
        assert definition["type"] == ("type" in op.levels)
        assert definition["system"] == ("system" in op.levels)
        if op.resource_types is not None:
            assert set(definition["resource"]) == set(op.resource_types)
        assert definition["affectsState"] == (not op.idempotent), op.name
    unused = {r.url for r in resources() if r.res_type == "OperationDefinition"} - {
        op.definition for op in mso
    }
    assert not unused, f"OperationDefinitions of no operation: {unused}"


def test_case_operation_parameters_follow_the_status_table() -> None:
    """The inputs documented for each case transition are the ones the state machine needs."""
    from fhir_server.workflow.status import TRANSITIONS, Action

    for action, transition in TRANSITIONS.items():
        definition = by_url()[f"{BASE}OperationDefinition/case-{action.value}"]
        inputs = {p["name"]: p["min"] for p in definition["parameter"] if p["use"] == "in"}
        expected: dict[str, int] = {}
        if transition.takes_reason:
            expected["reason"] = 1 if transition.needs_reason else 0
        if action is Action.ASSIGN:
            expected["provider"] = 1
        if action is Action.COMPLETE:
            expected["report"] = 0
        assert inputs == expected, action
        outputs = [p for p in definition["parameter"] if p["use"] == "out"]
        assert [(p["name"], p["type"]) for p in outputs] == [("return", "Task")]
