"""De-identification of DICOM instances: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile (section E.1, Table E.1-1, column "Basic Prof.").

Pure functions over pydicom datasets; the action table is data
(``mappings/dicom/deidentification.json``), read once by :func:`load_profile`. Per attribute:
``D`` a dummy value of its VR, ``Z`` zero length, ``X`` removed, ``K`` kept, ``C`` cleaned (here:
as the table's ``resolve`` says), ``U`` a new UID replacing the original consistently across the
instances of a study (:class:`UidMap`, UIDs under the ``2.25`` root from UUIDs, PS3.5 B.2);
combined codes (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) resolve to the choice that keeps
any IOD valid. The actions apply at every nesting level of sequences. Private attributes, curves
(``50xx``) and overlay planes (``60xx``) are removed. The patient's name and ID become a
pseudonym (a dummy value, which PS3.15 E.1 allows for ``Z``).

Pixel data is never cleaned (the Clean Pixel Data Option is not implemented): an instance
whose Burned In Annotation (0028,0301) is ``YES`` is refused with :class:`BurnedInAnnotation`.

The de-identified dataset records how it was made: Patient Identity Removed (0012,0062)
``YES``, De-identification Method (0012,0063) and De-identification Method Code Sequence
(0012,0064) with ``113100`` (DCM) "Basic Application Confidentiality Profile".

Nothing here logs: the values handled are patient data.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

PROFILE_RESOURCE = ("mappings.dicom", "deidentification.json")
DICOM_UID_ROOT = "1.2.840.10008."
"""UIDs DICOM itself registers (SOP Classes, Transfer Syntaxes, coding schemes …): kept."""
NEW_UID_ROOT = "2.25."
_TEXT_VRS = frozenset({"AE", "AS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM"})
_TEXT_VRS |= {"UC", "UR", "UT"}
BURNED_IN_ANNOTATION = Tag(0x0028, 0x0301)


class BurnedInAnnotation(ValueError):
    """The instance declares text burned into its pixels: the Basic Profile without the Clean
    Pixel Data Option cannot make it safe, so it is refused."""


@dataclass(frozen=True)
class Profile:
    """The action table of :func:`load_profile`, compiled: tag -> action code."""

    actions: Mapping[int, str]
    resolve: Mapping[str, str]
    resolve_sequence: Mapping[str, str]
    group_actions: Mapping[int, str]  # high byte of a repeating group (0x50, 0x60) -> action
    keep_uids: frozenset[int]
    pseudonym_tags: frozenset[int]
    dummy_values: Mapping[str, Any]
    method: Mapping[str, Any]

    def action_for(self, tag: BaseTag, vr: str) -> str | None:
        """The resolved action for an attribute (``None``: not in the table)."""
        group = tag.group & 0xFF01  # the even groups 50xx, 60xx (odd ones are private)
        if group in self.group_actions:
            return self.group_actions[group]
        code = self.actions.get(int(tag))
        if code is None:
            return None
        table = self.resolve_sequence if vr == "SQ" else self.resolve
        return table.get(code, code)


def _tag(text: str) -> int:
    """``(gggg,eeee)`` -> the tag as an int."""
    group, element = text.strip("()").split(",")
    return int(group + element, 16)


def _without_comments(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if not k.startswith("_")}


def profile_from_table(table: Mapping[str, Any]) -> Profile:
    """Compile the JSON action table (the layout of ``deidentification.json``)."""
    rules = table["rules"]
    groups = {}
    for pattern, rule in rules["repeating_groups"].items():
        high = int(pattern.strip("()")[:2], 16)
        groups[high << 8] = rule["action"]
    return Profile(
        actions={_tag(t): a["action"] for t, a in table["attributes"].items()},
        resolve=_without_comments(table["resolve"]),
        resolve_sequence=_without_comments(table["resolve_sequence"]),
        group_actions=groups,
        keep_uids=frozenset(_tag(t) for t in rules["keep_uids"]),
        pseudonym_tags=frozenset(_tag(t) for t in rules["pseudonym"]),
        dummy_values=dict(table["dummy_values"]),
        method=dict(table["method"]),
    )


@cache
def load_profile() -> Profile:
    """The Basic Application Level Confidentiality Profile table shipped with the mappings."""
    package, name = PROFILE_RESOURCE
    text = resources.files(package).joinpath(name).read_text(encoding="utf-8")
    return profile_from_table(json.loads(text))


def new_uid() -> str:
    """A fresh UID under ``2.25`` (a UUID as a decimal integer, DICOM PS3.5 B.2)."""
    return f"{NEW_UID_ROOT}{uuid.uuid4().int}"


def keyed_uid(secret: bytes, context: str, original: str) -> str:
    """The replacement of ``original`` in ``context`` (a de-identification request) under
    ``2.25``: a UUID made of HMAC-SHA256(``secret``, context and original), so doing the same
    request again gives the same UIDs, and nobody without ``secret`` can link them back."""
    digest = hmac.new(secret, f"{context}|{original}".encode(), hashlib.sha256).digest()
    return f"{NEW_UID_ROOT}{uuid.UUID(bytes=digest[:16], version=4).int}"


@dataclass
class UidMap:
    """Original UID -> its replacement, shared by every instance of a study (and of the
    studies de-identified together) so references between them stay consistent."""

    mapping: dict[str, str] = field(default_factory=dict)
    derive: Callable[[str], str] | None = None  # original -> replacement; else a fresh UID

    def replace(self, original: str) -> str:
        """The replacement of ``original`` (made on first use)."""
        found = self.mapping.get(original)
        if found is None:
            made = self.derive(original) if self.derive else new_uid()
            found = self.mapping[original] = made
        return found

    def reverse(self) -> dict[str, str]:
        """Replacement -> original: what the mapping's reader needs to undo it."""
        return {new: old for old, new in self.mapping.items()}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.mapping.items())


@dataclass(frozen=True)
class PatientEntry:
    """What links the pseudonym back to the patient without holding the identity in clear:
    SHA-256 of the original Patient ID and Patient's Name (hex; empty-string hashes when
    absent)."""

    pseudonym: str
    patient_id_sha256: str
    patient_name_sha256: str


@dataclass(frozen=True)
class Deidentified:
    """One de-identified instance and the mapping entries to record for it."""

    dataset: Dataset
    uids: dict[str, str]  # original -> new, the UIDs of this instance
    patient: PatientEntry


def _sha256(value: Any) -> str:
    return hashlib.sha256(str(value or "").encode("utf-8")).hexdigest()


def has_burned_in_annotation(dataset: Dataset) -> bool:
    """True when Burned In Annotation (0028,0301) is ``YES``."""
    element = dataset.get(BURNED_IN_ANNOTATION)
    return element is not None and str(element.value or "").strip().upper() == "YES"


def deidentify(
    dataset: Dataset, *, profile: Profile, uid_map: UidMap, pseudonym: str
) -> Deidentified:
    """A de-identified copy of ``dataset`` (the input is not changed).

    ``uid_map`` is updated with every UID replaced; ``pseudonym`` replaces the patient's name
    and ID. Raises :class:`BurnedInAnnotation` for an instance with burned-in text.
    """
    if has_burned_in_annotation(dataset):
        raise BurnedInAnnotation("the instance has burned-in annotation (0028,0301) YES")
    patient = PatientEntry(
        pseudonym=pseudonym,
        patient_id_sha256=_sha256(dataset.get("PatientID")),
        patient_name_sha256=_sha256(dataset.get("PatientName")),
    )
    out = copy.deepcopy(dataset)
    cleaner = _Cleaner(profile, uid_map, pseudonym)
    cleaner.clean(out, dummy_text=False)
    file_meta = getattr(out, "file_meta", None)
    if file_meta is not None:
        cleaner.clean(file_meta, dummy_text=False)
        if "SOPInstanceUID" in out:
            file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    _record_method(out, profile)
    return Deidentified(out, dict(cleaner.used), patient)


def _values(value: Any) -> list[str]:
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)] if value not in (None, "") else []


def _record_method(dataset: Dataset, profile: Profile) -> None:
    """Patient Identity Removed, De-identification Method and its code sequence (PS3.3 C.7.1.1)."""
    method = profile.method
    dataset.PatientIdentityRemoved = method["PatientIdentityRemoved"]
    dataset.DeidentificationMethod = method["DeidentificationMethod"]
    items = []
    for code in method["DeidentificationMethodCodeSequence"]:
        item = Dataset()
        for keyword, value in code.items():
            setattr(item, keyword, value)
        items.append(item)
    dataset.DeidentificationMethodCodeSequence = Sequence(items)


class _Cleaner:
    """Applies a :class:`Profile` to a dataset in place, recursing into sequences."""

    def __init__(self, profile: Profile, uid_map: UidMap, pseudonym: str) -> None:
        self.profile = profile
        self.uid_map = uid_map
        self.pseudonym = pseudonym
        self.used: dict[str, str] = {}

    def clean(self, dataset: Dataset, *, dummy_text: bool) -> None:
        """Clean ``dataset``; ``dummy_text``: inside a ``D`` sequence, where every text value
        not otherwise handled becomes a dummy."""
        for tag in list(dataset.keys()):
            if tag.is_private:
                del dataset[tag]
                continue
            element = dataset[tag]
            vr = _vr(element.VR)
            action = self.profile.action_for(tag, vr)
            if action is None:
                self._unlisted(dataset, tag, vr, dummy_text=dummy_text)
            else:
                self._apply(dataset, tag, vr, action)

    def _apply(self, dataset: Dataset, tag: BaseTag, vr: str, action: str) -> None:
        element = dataset[tag]
        if action == "X":
            del dataset[tag]
        elif action == "K":
            if vr == "SQ":
                self._items(element.value, dummy_text=False)
        elif action == "Z":
            if int(tag) in self.profile.pseudonym_tags:
                element.value = self.pseudonym
            else:
                element.value = [] if vr == "SQ" else _empty(vr)
        elif action == "D":
            if vr == "SQ":
                self._items(element.value, dummy_text=True)
            elif not self._dummy(dataset, tag, vr):
                del dataset[tag]
        elif action == "U":
            self._replace_uids(dataset, tag, vr)
        elif action == "U*":
            self._items(element.value, dummy_text=False)
        else:  # an action code this implementation does not know: the safe choice
            del dataset[tag]

    def _unlisted(self, dataset: Dataset, tag: BaseTag, vr: str, *, dummy_text: bool) -> None:
        element = dataset[tag]
        if vr == "SQ":
            self._items(element.value, dummy_text=dummy_text)
        elif vr == "UI":
            if int(tag) not in self.profile.keep_uids:
                self._replace_uids(dataset, tag, vr)
        elif dummy_text and vr in _TEXT_VRS and element.value not in (None, ""):
            self._dummy(dataset, tag, vr)

    def _items(self, items: Any, *, dummy_text: bool) -> None:
        for item in items or ():
            self.clean(item, dummy_text=dummy_text)

    def _dummy(self, dataset: Dataset, tag: BaseTag, vr: str) -> bool:
        if vr not in self.profile.dummy_values:
            return False
        dataset[tag].value = self.profile.dummy_values[vr]
        return True

    def _replace_uids(self, dataset: Dataset, tag: BaseTag, vr: str) -> None:
        element = dataset[tag]
        if vr != "UI":
            del dataset[tag]
            return
        values = _values(element.value)
        replaced = [v if v.startswith(DICOM_UID_ROOT) else self._new(v) for v in values]
        if not replaced:
            return
        element.value = replaced if len(replaced) > 1 else replaced[0]

    def _new(self, original: str) -> str:
        original = original.strip("\0 ")
        self.used[original] = new = self.uid_map.replace(original)
        return new


def _vr(vr: str) -> str:
    """A VR, the first choice of an ambiguous one (``US or SS`` -> ``US``)."""
    return vr.split(" or ")[0]


def _empty(vr: str) -> Any:
    return "" if vr in _TEXT_VRS or vr in ("CS", "UI") else None
