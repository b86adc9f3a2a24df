"""SearchParameter registry: the official R4 parameters plus the MSO ones from ``profiles/``.

http://hl7.org/fhir/R4/searchparameter.html and http://hl7.org/fhir/R4/search.html#standard.
Each parameter applies to the resource types in its ``base`` (Resource / DomainResource ones to
every type). Per resource type the registry precompiles the FHIRPath expression of each
parameter, restricted to the union branches that start from that type, so index extraction
only evaluates what applies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from fhir_server.fhir.definitions import load_json, resource_types
from fhir_server.search.fhirpath import CompiledPath, compile_relative
from fhir_server.search.hashing import hash64

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles" / "search-parameters"
BASE_TYPES = frozenset({"Resource", "DomainResource"})
# Parameters answered from the resource table or by dedicated code, never from an expression.
SPECIAL_CODES = frozenset({"_id", "_lastUpdated", "_text", "_content", "_query", "_list", "_has"})


@dataclass(frozen=True, slots=True)
class Component:
    """One component of a composite parameter."""

    definition: str
    expression: str


@dataclass(slots=True, eq=False)
class SearchParam:
    """A SearchParameter as the server uses it."""

    code: str
    type: str
    url: str
    description: str
    expression: str | None
    base: tuple[str, ...]
    target: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()
    modifiers: tuple[str, ...] = ()
    _identities: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    @property
    def resource_level(self) -> bool:
        """True for parameters defined on Resource / DomainResource (``_tag``, ``_profile`` …)."""
        return bool(set(self.base) & BASE_TYPES)

    def owner(self, resource_type: str) -> str:
        """The type part of this parameter's hash identity for ``resource_type``."""
        return "Resource" if self.resource_level else resource_type

    def identity(self, resource_type: str, suffix: str = "") -> int:
        """``hash_identity`` of this parameter's index rows for ``resource_type`` (memoized:
        every extraction and search asks for it)."""
        key = (resource_type, suffix)
        found = self._identities.get(key)
        if found is None:
            found = self._identities[key] = hash64(self.owner(resource_type), self.code + suffix)
        return found


@dataclass(slots=True)
class TypeExtractor:
    """The precompiled extraction plan of one resource type."""

    resource_type: str
    paths: list[tuple[SearchParam, CompiledPath]] = field(default_factory=list)
    composites: list[tuple[SearchParam, CompiledPath, list[tuple[SearchParam, CompiledPath]]]] = (
        field(default_factory=list)
    )


class SearchRegistry:
    """The SearchParameters the server supports, per resource type."""

    def __init__(self, params: Iterable[dict[str, Any]]) -> None:
        self._by_type: dict[str, dict[str, SearchParam]] = {}
        self._by_url: dict[str, SearchParam] = {}
        self._extractors: dict[str, TypeExtractor] = {}
        types = resource_types()
        for raw in params:
            param = _to_param(raw)
            if param is None:
                continue
            self._by_url[param.url] = param
            targets = types if param.resource_level else [b for b in param.base if b in types]
            for rt in targets:
                self._by_type.setdefault(rt, {})[param.code] = param

    @classmethod
    def load(cls, extra_dirs: Iterable[Path] = ()) -> SearchRegistry:
        """Load the R4 SearchParameters and the MSO ones from ``profiles/search-parameters``."""
        bundle = load_json("search-parameters.json")
        raws = [e["resource"] for e in bundle.get("entry", [])]
        for folder in (PROFILES_DIR, *extra_dirs):
            raws.extend(load_profile_params(folder))
        return cls(raws)

    # -- lookups ------------------------------------------------------------------------------

    def params_for(self, resource_type: str) -> Mapping[str, SearchParam]:
        """Every parameter that applies to ``resource_type``, by code."""
        return self._by_type.get(resource_type, {})

    def get(self, resource_type: str, code: str) -> SearchParam | None:
        """One parameter of ``resource_type`` by code."""
        return self._by_type.get(resource_type, {}).get(code)

    def by_url(self, url: str) -> SearchParam | None:
        """A parameter by canonical URL (composite components refer to them so)."""
        return self._by_url.get(url)

    @cached_property
    def resource_types(self) -> frozenset[str]:
        """Types that have at least one parameter."""
        return frozenset(self._by_type)

    def extractor(self, resource_type: str) -> TypeExtractor:
        """The compiled extraction plan of ``resource_type`` (built on first use)."""
        plan = self._extractors.get(resource_type)
        if plan is None:
            plan = self._build_extractor(resource_type)
            self._extractors[resource_type] = plan
        return plan

    def _build_extractor(self, resource_type: str) -> TypeExtractor:
        plan = TypeExtractor(resource_type)
        for param in self.params_for(resource_type).values():
            if param.code in SPECIAL_CODES or not param.expression or param.type == "special":
                continue
            try:
                path = CompiledPath(param.expression, resource_type)
            except Exception:  # an expression fhirpathpy cannot parse: not indexed
                log.warning("cannot compile %s for %s", param.url, resource_type)
                continue
            if path.empty:
                continue
            if param.type == "composite":
                parts = []
                for comp in param.components:
                    sub = self.by_url(comp.definition)
                    if sub is None:
                        break
                    try:
                        parts.append((sub, compile_relative(comp.expression)))
                    except ValueError:
                        break
                else:
                    plan.composites.append((param, path, parts))
                continue
            plan.paths.append((param, path))
        return plan


def _to_param(raw: dict[str, Any]) -> SearchParam | None:
    if raw.get("resourceType") != "SearchParameter" or not raw.get("code") or not raw.get("type"):
        return None
    return SearchParam(
        code=raw["code"],
        type=raw["type"],
        url=raw.get("url", ""),
        description=raw.get("description", ""),
        expression=raw.get("expression"),
        base=tuple(raw.get("base", ())),
        target=tuple(raw.get("target", ())),
        components=tuple(
            Component(c.get("definition", ""), c.get("expression", ""))
            for c in raw.get("component", ())
        ),
        modifiers=tuple(raw.get("modifier", ())),
    )


def load_profile_params(folder: Path) -> list[dict[str, Any]]:
    """SearchParameter resources from ``*.json`` files in ``folder`` (single ones or Bundles)."""
    out: list[dict[str, Any]] = []
    if not folder.is_dir():
        return out
    for file in sorted(folder.glob("*.json")):
        data = orjson.loads(file.read_bytes())
        if data.get("resourceType") == "Bundle":
            out.extend(e["resource"] for e in data.get("entry", []) if "resource" in e)
        else:
            out.append(data)
    return out
