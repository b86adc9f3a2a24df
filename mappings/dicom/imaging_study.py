"""DICOM JSON model -> FHIR R4 ImagingStudy, driven by the table in ``imaging_study.json``.

Input: the instances of one study in the DICOM JSON model (DICOM PS3.18 F.2: one object per
instance, ``{"0020000D": {"vr": "UI", "Value": ["1.2…"]}, …}``, as DICOMweb ``/metadata``
returns it). Output: an ImagingStudy (http://hl7.org/fhir/R4/imagingstudy.html) as JSON, without
``subject``, ``basedOn`` and ``endpoint``, which the gateway's sync adds.

Every attribute read is named in the table with its level, target element and transform; this
module holds only the transforms and the walk over study, series and instances. Pure functions,
no I/O beyond reading the table once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

DicomJson = Mapping[str, Any]
"""One instance in the DICOM JSON model (PS3.18 F.2)."""
Transform = Callable[[list[Any], dict[str, Any]], Any]
"""Values of a row's attribute(s) (first value each, ``None`` when absent) and the table ->
the element's value (``None``: write nothing)."""


@cache
def table() -> dict[str, Any]:
    """The mapping table (``imaging_study.json``), read once."""
    text = resources.files(__package__).joinpath("imaging_study.json").read_text("utf-8")
    return json.loads(text)


# -- reading the DICOM JSON model --------------------------------------------------------------


def values(instance: DicomJson, tag: str) -> list[Any]:
    """The ``Value`` array of ``tag`` in ``instance`` ([] when absent or empty)."""
    element = instance.get(tag.upper()) or instance.get(tag.lower())
    if not isinstance(element, Mapping):
        return []
    found = element.get("Value")
    return list(found) if isinstance(found, list) else []


def first(instance: DicomJson, tag: str) -> Any:
    """The first value of ``tag`` (``None`` when absent); strings stripped, '' -> ``None``."""
    found = values(instance, tag)
    value = found[0] if found else None
    if isinstance(value, str):
        value = value.strip() or None
    return value


def _tags(row: Mapping[str, Any]) -> list[str]:
    return list(row["tags"]) if "tags" in row else [row["tag"]]


def _row_values(row: Mapping[str, Any], instances: Sequence[DicomJson]) -> list[Any] | None:
    """The row's values from the first instance having its (first) attribute: the first value
    of each attribute, or for a ``multiple`` row the whole value list of its one attribute."""
    tags = _tags(row)
    for instance in instances:
        if first(instance, tags[0]) is not None:
            if row.get("multiple"):
                return [[v for v in values(instance, tags[0]) if v not in (None, "")]]
            return [first(instance, tag) for tag in tags]
    return None


# -- transforms --------------------------------------------------------------------------------


def _text(vals: list[Any], _t: dict[str, Any]) -> str | None:
    return str(vals[0]) if vals[0] is not None else None


def _unsigned_int(vals: list[Any], _t: dict[str, Any]) -> int | None:
    try:
        number = int(str(vals[0]).strip())
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def _uid_identifier(vals: list[Any], t: dict[str, Any]) -> dict[str, Any]:
    return {"system": t["systems"]["dicom_uid"], "value": f"urn:oid:{vals[0]}"}


def _accession_identifier(vals: list[Any], t: dict[str, Any]) -> dict[str, Any]:
    kind = {"system": t["systems"]["identifier_type"], "code": "ACSN"}
    return {"type": {"coding": [kind]}, "value": str(vals[0])}


def _date_time(vals: list[Any], _t: dict[str, Any]) -> str | None:
    """DA (+ TM + offset) -> FHIR dateTime; a time only with a known offset from UTC."""
    date = str(vals[0]).replace("-", "").replace(".", "")
    if len(date) != 8 or not date.isdigit():
        return None
    day = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    time, offset = [*vals, None, None][1:3]
    if time is None or offset is None:
        return day
    clock = str(time).replace(":", "")
    offset = str(offset)
    whole, _, fraction = clock.partition(".")
    if not whole.isdigit() or len(whole) < 2 or len(offset) != 5 or offset[0] not in "+-":
        return day
    hh, mm, ss = whole[:2], whole[2:4] or "00", whole[4:6] or "00"
    fraction = f".{fraction}" if fraction.isdigit() else ""
    return f"{day}T{hh}:{mm}:{ss}{fraction}{offset[:3]}:{offset[3:]}"


def _person_display(vals: list[Any], _t: dict[str, Any]) -> dict[str, str] | None:
    name = vals[0]
    if isinstance(name, Mapping):
        name = name.get("Alphabetic")
    if not isinstance(name, str) or not name.strip("^ "):
        return None
    family, given = [*name.split("=")[0].split("^"), "", ""][:2]
    display = " ".join(p for p in (given, family) if p.strip())
    return {"display": display}


def modality_coding(value: str, t: dict[str, Any]) -> dict[str, str]:
    """A DICOM modality code (CID 29/33) as a Coding."""
    return {"system": t["systems"]["modality"], "code": value}


def _modality_coding(vals: list[Any], t: dict[str, Any]) -> dict[str, str]:
    return modality_coding(str(vals[0]), t)


def _modality_codings(vals: list[Any], t: dict[str, Any]) -> list[dict[str, str]]:
    return [modality_coding(str(v).strip(), t) for v in vals[0]]


def _coded(value: str, table_name: str, t: dict[str, Any]) -> dict[str, str]:
    known = t[table_name].get(value.upper())
    if isinstance(known, list):
        return {"system": t["systems"]["snomed"], "code": known[0], "display": known[1]}
    return {"display": value}


def _body_site(vals: list[Any], t: dict[str, Any]) -> dict[str, str]:
    return _coded(str(vals[0]), "body_parts", t)


def _laterality(vals: list[Any], t: dict[str, Any]) -> dict[str, str] | None:
    value = str(vals[0]).upper()
    return _coded(value, "laterality", t) if value in t["laterality"] else None


def _sop_class(vals: list[Any], t: dict[str, Any]) -> dict[str, str]:
    return {"system": t["systems"]["rfc3986"], "code": f"urn:oid:{vals[0]}"}


TRANSFORMS: dict[str, Transform] = {
    "text": _text,
    "unsigned_int": _unsigned_int,
    "uid_identifier": _uid_identifier,
    "accession_identifier": _accession_identifier,
    "date_time": _date_time,
    "person_display": _person_display,
    "modality_coding": _modality_coding,
    "modality_codings": _modality_codings,
    "body_site": _body_site,
    "laterality": _laterality,
    "sop_class": _sop_class,
}
"""The transforms the table may name."""

# ImagingStudy elements that repeat (0..*) collect a list; the others take one value.
_STUDY_REPEATING = frozenset({"identifier", "modality"})


def _apply(
    rows: Iterable[Mapping[str, Any]],
    instances: Sequence[DicomJson],
    repeating: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    t = table()
    out: dict[str, Any] = {}
    for row in rows:
        vals = _row_values(row, instances)
        if vals is None:
            continue
        value = TRANSFORMS[row["transform"]](vals, t)
        if value is None:
            continue
        target = row["target"]
        if target in repeating:
            out.setdefault(target, []).extend(value if isinstance(value, list) else [value])
        else:
            out[target] = value
    return out


# -- the walk ----------------------------------------------------------------------------------


def _key(name: str) -> str:
    return table()["keys"][name]["tag"]


def _number_order(item: Mapping[str, Any]) -> tuple[int, int, str]:
    number = item.get("number")
    return (0 if number is not None else 1, number or 0, str(item.get("uid")))


def _series(instances: Sequence[DicomJson]) -> dict[str, Any]:
    t = table()
    series = _apply(t["series"], instances)
    series["numberOfInstances"] = len(instances)
    members = [_apply(t["instance"], [instance]) for instance in instances]
    series["instance"] = sorted((m for m in members if m.get("uid")), key=_number_order)
    return series


def group_series(instances: Iterable[DicomJson]) -> dict[str, list[DicomJson]]:
    """The instances by SeriesInstanceUID (first-seen order), duplicates of a SOP instance
    (the same SOPInstanceUID twice) kept once."""
    out: dict[str, list[DicomJson]] = {}
    seen: set[str] = set()
    for instance in instances:
        sop = first(instance, _key("sop_uid"))
        if sop is not None:
            if sop in seen:
                continue
            seen.add(sop)
        out.setdefault(str(first(instance, _key("series_uid")) or ""), []).append(instance)
    return out


def _dedupe(codings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for coding in codings:
        if coding not in out:
            out.append(coding)
    return out


def imaging_study(instances: Sequence[DicomJson]) -> dict[str, Any]:
    """The ImagingStudy of one study's instances (DICOM JSON model), without ``subject``,
    ``basedOn`` and ``endpoint``. Raises ``ValueError`` when no instance has a
    StudyInstanceUID or they name different studies."""
    study_uid, _, _, _ = study_keys(instances)
    t = table()
    body: dict[str, Any] = {"resourceType": "ImagingStudy", "status": "available"}
    body.update(_apply(t["study"], instances, _STUDY_REPEATING))
    series = [_series(members) for members in group_series(instances).values()]
    series = [s for s in series if s.get("uid")]
    series.sort(key=_number_order)
    modalities = body.get("modality", []) + [s["modality"] for s in series if "modality" in s]
    if modalities:
        body["modality"] = _dedupe(modalities)
    body["numberOfSeries"] = len(series)
    body["numberOfInstances"] = sum(s["numberOfInstances"] for s in series)
    if series:
        body["series"] = series
    if not any(i.get("value") == f"urn:oid:{study_uid}" for i in body.get("identifier", [])):
        raise ValueError("the study has no StudyInstanceUID")
    return body


def study_keys(instances: Sequence[DicomJson]) -> tuple[str, str | None, str | None, str | None]:
    """``(StudyInstanceUID, PatientID, IssuerOfPatientID, AccessionNumber)`` of one study's
    instances (the first instance having each). ``ValueError`` without a StudyInstanceUID or
    for instances of several studies."""
    uids = {first(i, _key("study_uid")) for i in instances} - {None}
    if len(uids) != 1:
        raise ValueError(
            "the instances name no StudyInstanceUID" if not uids else "instances of several studies"
        )

    def lookup(name: str) -> str | None:
        found = next((v for i in instances if (v := first(i, _key(name))) is not None), None)
        return str(found) if found is not None else None

    return str(uids.pop()), lookup("patient_id"), lookup("issuer"), lookup("accession")
