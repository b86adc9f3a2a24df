"""MSO conformance resources: read from ``profiles/`` and ``terminology/``, stored on the server.

The CodeSystems, ValueSets, ConceptMaps, StructureDefinitions, Questionnaires and
SearchParameters of the platform are canonical resources
(http://hl7.org/fhir/R4/resource.html#canonical): JSON files in the source tree, each with a
canonical ``url`` and a ``version``. :func:`install` stores them through the repository, so they
are served like any resource (``GET /fhir/CodeSystem?url=…``) and the ``:in`` / ``:not-in`` /
``:above`` / ``:below`` search modifiers find the MSO ValueSets and CodeSystems by URL.

Each resource is matched by its canonical ``url`` (preferring the stored copy with the same
``version``): it is created when absent and updated only when its content differs, so a restart
with unchanged files writes nothing and makes no new version. A package upgrade that changes a
resource's ``version`` updates the stored resource in place (the old version stays in its
history), keeping one current resource per canonical URL.

Safe when two processes load at once: every resource is written under the same PostgreSQL
advisory lock a conditional create on ``url`` takes (:meth:`Tx.lock_criteria`) and re-checked
after the lock is held; SQLite write transactions are serialized anyway. A first read-only pass
skips the write transaction altogether when nothing changed.

It runs once per deployment, not per worker: ``mso serve`` and ``mso migrate`` (to head) call
:func:`load_conformance` after migrating, before any worker starts; ``mso load-conformance``
runs it on demand.
"""

from __future__ import annotations

import copy
import site
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from fhir_server.config import Settings
    from fhir_server.storage.repository import Repository, StoredResource, Tx

FOLDERS = ("profiles", "terminology")
"""Top-level folders holding conformance resources (``*.json``, searched recursively)."""
DATA_NAME = "mso-fhir-server"
"""A wheel installs the folders under ``<prefix>/share/mso-fhir-server/`` (pyproject data-files)."""


class ConformanceError(Exception):
    """A conformance file that is not a canonical FHIR resource (or a Bundle of them)."""


@dataclass(frozen=True, slots=True)
class ConformanceResource:
    """One canonical resource and the file it comes from."""

    source: Path
    resource: dict[str, Any]

    @property
    def res_type(self) -> str:
        """``resourceType``."""
        return self.resource["resourceType"]

    @property
    def res_id(self) -> str:
        """The stable logical id the resource is stored under when new."""
        return self.resource["id"]

    @property
    def url(self) -> str:
        """The canonical URL."""
        return self.resource["url"]

    @property
    def version(self) -> str | None:
        """The business version (``None`` when the file has none)."""
        return self.resource.get("version")

    @property
    def key(self) -> str:
        """``Type/id``."""
        return f"{self.res_type}/{self.res_id}"


@dataclass(slots=True)
class LoadResult:
    """What :func:`install` did, as ``Type/id`` lists."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when anything was written."""
        return bool(self.created or self.updated)

    def summary(self) -> str:
        """One line for logs and the command line."""
        return (
            f"conformance resources: {len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged"
        )


def conformance_root() -> Path:
    """The folder holding ``profiles/`` and ``terminology/``.

    The source checkout (an editable install runs from it) comes first, then the share folder
    a wheel installs the files into.
    """
    candidates = [Path(__file__).resolve().parents[1]]
    prefixes = [sysconfig.get_path("data"), sys.prefix, getattr(site, "USER_BASE", None)]
    candidates.extend(Path(p) / "share" / DATA_NAME for p in prefixes if p)
    for root in candidates:
        if all((root / folder).is_dir() for folder in FOLDERS):
            return root
    raise ConformanceError(
        "MSO conformance files not found; looked in " + ", ".join(str(c) for c in candidates)
    )


def conformance_files(root: Path | None = None) -> list[Path]:
    """Every ``*.json`` under ``profiles/`` and ``terminology/``, sorted."""
    root = root or conformance_root()
    return sorted(path for folder in FOLDERS for path in (root / folder).rglob("*.json"))


def read_resources(root: Path | None = None) -> list[ConformanceResource]:
    """The canonical resources of every conformance file (Bundles are unpacked), sorted by type
    and URL; :class:`ConformanceError` for a file that holds anything else."""
    out: list[ConformanceResource] = []
    for path in conformance_files(root):
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ConformanceError(f"{path}: not JSON ({exc})") from None
        for item in _unpack(data):
            if not isinstance(item, dict) or not all(
                isinstance(item.get(key), str) for key in ("resourceType", "id", "url")
            ):
                raise ConformanceError(f"{path}: a resource without resourceType, id or url")
            out.append(ConformanceResource(path, item))
    out.sort(key=lambda r: (r.res_type, r.url, r.version or ""))
    return out


def _unpack(data: Any) -> Iterator[Any]:
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        for entry in data.get("entry") or ():
            yield (entry or {}).get("resource")
    else:
        yield data


def install(repo: Repository, resources: Iterable[ConformanceResource] | None = None) -> LoadResult:
    """Store ``resources`` (default: every conformance file) through ``repo``; idempotent.

    Creates what is missing, updates what differs, leaves the rest untouched (no new version).
    A resource that fails validation aborts the whole load (nothing is written).
    """
    items = list(read_resources() if resources is None else resources)
    result = repo.read_only(lambda tx: _plan(tx, items, write=False))
    if not result.changed:
        return result
    return repo.write(lambda tx: _plan(tx, items, write=True))


def load_conformance(settings: Settings) -> LoadResult:
    """Open the database of ``settings``, :func:`install` every conformance file, close it."""
    from fhir_server.wiring import build_repository

    repo = build_repository(settings)
    try:
        return install(repo)
    finally:
        repo.engine.dispose()


def _plan(tx: Tx, items: list[ConformanceResource], *, write: bool) -> LoadResult:
    """Compare ``items`` with what is stored; with ``write``, also store the differences."""
    result = LoadResult()
    for item in items:
        if write:
            tx.lock_criteria(item.res_type, [("url", item.url)])
        stored = _match(tx, item)
        if stored is not None and _same(stored.resource, item.resource):
            result.unchanged.append(item.key)
            continue
        if not write:
            (result.created if stored is None else result.updated).append(item.key)
            continue
        body = copy.deepcopy(item.resource)
        if stored is None:
            _, created = tx.update(item.res_type, item.res_id, body)
            (result.created if created else result.updated).append(item.key)
        else:
            body["id"] = stored.res_id
            tx.update(item.res_type, stored.res_id, body, if_match=stored.version)
            result.updated.append(f"{item.res_type}/{stored.res_id}")
    return result


def _match(tx: Tx, item: ConformanceResource) -> StoredResource | None:
    """The stored resource with ``item``'s canonical URL: the same version and id preferred."""
    found = tx.find(item.res_type, [("url", item.url)])
    if not found:
        return None
    return min(
        found,
        key=lambda s: (
            s.resource.get("version") != item.version,
            s.res_id != item.res_id,
            s.res_id,
        ),
    )


def _same(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """True when ``stored`` is ``wanted`` apart from id and the server-set meta elements."""
    return _comparable(stored) == _comparable(wanted)


def _comparable(resource: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    meta = {
        k: v
        for k, v in (resource.get("meta") or {}).items()
        if k not in ("versionId", "lastUpdated")
    }
    if meta:
        out["meta"] = meta
    return out
