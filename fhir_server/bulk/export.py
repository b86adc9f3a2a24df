"""Running one export job: resources to NDJSON files, resumable from its last checkpoint
(https://hl7.org/fhir/uv/bulkdata/STU3/export.html#bulk-data-output-file-request).

The first worker to claim a job plans it: the snapshot bound (the largest resource pid then;
later resources are not exported), the types (``_type``, else every type present that the
caller's scopes let it read; the Patient compartment's types for Patient and Group exports),
a Group's members, and an estimate of the rows for ``X-Progress``. The plan is the checkpoint's
first state, so a worker that resumes the job exports the same set.

Then, type by type, resources come from ``Tx.iter_search`` as the job's caller (the access
policy applies exactly as to a search; chat is excluded for everyone) in pid order, in keyset
batches bounded by count and by bytes, after the pid the checkpoint names. They go to an
NDJSON file, split at ``bulk_file_max_bytes``; when a file is complete it is made durable and
the checkpoint (files done, last pid) is committed under the job's fenced lease. A worker
killed at any point leaves a checkpoint from which the next one continues: files named by the
checkpoint are rewritten, never duplicated.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import orjson

from fhir_server.auth.policy import not_chat
from fhir_server.auth.principal import Principal
from fhir_server.auth.scopes import Permission
from fhir_server.bulk import jobs
from fhir_server.bulk.files import OutputStore, PartWriter, part_name
from fhir_server.bulk.request import ExportRequest
from fhir_server.fhir.outcome import FhirError
from fhir_server.search.budget import current_limits
from fhir_server.search.summary import apply as shape
from fhir_server.search.types.reference import parse_reference
from fhir_server.storage import bulk_reads
from fhir_server.storage.blobs import BlobStore
from fhir_server.storage.records import StoredResource, format_instant, utc_now
from fhir_server.storage.repository import Repository, Tx
from fhir_server.storage.searching import compartment_params

log = logging.getLogger(__name__)

DELETED = "deleted"
ERROR = "error"


class JobLost(Exception):
    """The worker no longer holds the job (its lease was taken over, or it was cancelled)."""


class Lease:
    """Keeps a claimed job's lease alive: renewed at every checkpoint and, between them,
    whenever a third of the lease has passed."""

    def __init__(self, repo: Repository, job: jobs.Job, seconds: float) -> None:
        self.repo = repo
        self.job = job
        self.seconds = seconds
        self._renewed = time.monotonic()

    def save(self, checkpoint: dict[str, Any] | None = None, **values: Any) -> None:
        """Renew the lease (storing ``checkpoint``); :class:`JobLost` if it is gone."""
        if not jobs.save(
            self.repo.engine, self.job, lease=self.seconds, checkpoint=checkpoint, **values
        ):
            raise JobLost(self.job.id)
        self._renewed = time.monotonic()

    def keep_alive(self, exported: int) -> None:
        """Renew the lease if a third of it has passed since the last renewal, with the count
        of resources ``exported`` so far (the status's progress)."""
        if time.monotonic() - self._renewed > self.seconds / 3:
            self.save(exported=exported)


class ExportRun:
    """One worker's run of one claimed job."""

    def __init__(
        self,
        repo: Repository,
        job: jobs.Job,
        *,
        store: OutputStore,
        blobs: BlobStore,
        lease: float,
        file_max_bytes: int,
        batch_size: int,
        batch_max_bytes: int,
    ) -> None:
        self.repo = repo
        self.job = job
        self.store = store
        self.blobs = blobs
        self.caller = Principal.from_dict(job.principal)
        self.request = ExportRequest.from_dict(job.request)
        self.lease = Lease(repo, job, lease)
        self.file_max_bytes = file_max_bytes
        self.batch_size = batch_size
        self.batch_max_bytes = batch_max_bytes
        self.state: dict[str, Any] = dict(job.checkpoint or {})

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Export everything still to do; the final checkpoint (the manifest's files)."""
        if "plan" not in self.state:
            self._plan()
        plan: list[str] = self.state["plan"]
        while self.state["step"] < len(plan):
            self._export_type(plan[self.state["step"]])
            self._next_step()
        if self.request.since and not self.state.get("deleted_done"):
            self._export_deleted()
        return self.state

    def _plan(self) -> None:
        with self.repo.unit(caller=self.caller, snapshot=False) as tx:
            bound = bulk_reads.snapshot_bound(tx)
            members = self._members(tx) if self.request.level == "group" else None
            types = self._types(tx, bound)
            estimate = bulk_reads.estimate(tx, types, bound)
        self.state = {
            "plan": types,
            "members": members,
            "bound": bound,
            "step": 0,
            "after": 0,
            "part": 1,
            "output": [],
            "deleted": [],
            "error": [],
            "exported": 0,
            # Provenance added by includeAssociatedData (not asked for in _type): only that
            # of the exported resources
            "associated": self.request.provenance
            and "Provenance" not in (self.request.types or ["Provenance"]),
        }
        self.lease.save(
            self.state, snapshot_pid=bound, estimate=estimate, transaction_time=utc_now()
        )

    def _types(self, tx: Tx, bound: int) -> list[str]:
        """The types to export, in a fixed order: asked for, present, readable by the caller."""
        present = set(bulk_reads.present_types(tx, bound))
        if self.request.level != "system":
            present &= set(compartment_params()) | {"Patient"}
        wanted = self.request.types if self.request.types is not None else sorted(present)
        if self.request.provenance and "Provenance" not in wanted:
            wanted = [*wanted, "Provenance"]
        scopes = self.caller.scopes
        return [t for t in wanted if t in present and scopes.grants(t, Permission.SEARCH)]

    def _members(self, tx: Tx) -> list[str]:
        """The patient ids of the Group (active members), narrowed by ``patient``."""
        group = tx.read("Group", self.request.group_id or "").resource
        ids: list[str] = []
        for member in group.get("member") or []:
            ref = str((member.get("entity") or {}).get("reference") or "")
            kind, _, rid = ref.partition("/")
            if kind == "Patient" and rid and not member.get("inactive") and rid not in ids:
                ids.append(rid)
        if self.request.patients:
            ids = [i for i in ids if i in self.request.patients]
        return ids

    def _compartment(self) -> tuple[str, Any] | None:
        if self.request.level == "group":
            return ("Patient", self.state["members"])
        if self.request.level == "patient":
            return ("Patient", self.request.patients or None)
        return None

    # -- one type -------------------------------------------------------------------------------

    def _export_type(self, rtype: str) -> None:
        writer: PartWriter | None = None
        try:
            with self.repo.unit(caller=self.caller, snapshot=False) as tx:
                associated = rtype == "Provenance" and self.state.get("associated")
                found = self._associated(tx) if associated else self._resources(tx, rtype)
                for stored in found:
                    if writer is None:
                        writer = self.store.open_part(
                            self.job.id, part_name(rtype, self.state["part"])
                        )
                    writer.write_line(self._line(tx, stored))
                    self.state["after"] = stored.pid
                    if writer.size >= self.file_max_bytes:
                        self._commit(writer, rtype, "output")
                        writer = None
                    else:
                        self.lease.keep_alive(self.state["exported"] + writer.count)
        except FhirError as err:
            # a search this type cannot run (a _typeFilter the data defeats): the other
            # types are still exported, and the error file says why this one is not whole
            if writer is not None:
                writer.discard()
                writer = None
            self._write_error(rtype, err)
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
        if writer is not None:
            self._commit(writer, rtype, "output")

    def _resources(
        self,
        tx: Tx,
        rtype: str,
        *,
        after: int | None = None,
        criteria: Sequence[tuple[str, str]] = (),
        compartment: bool = True,
    ) -> Iterator[StoredResource]:
        """The job's ``rtype`` resources after the checkpoint (or ``after``), narrowed by
        ``criteria``, in pid order, each once."""
        after = self.state["after"] if after is None else after
        bound = self.state["bound"]
        where = [
            not_chat,
            lambda r: r.c.pid > after,
            lambda r: r.c.pid <= bound,
        ]
        dated: list[tuple[str, str]] = []
        if self.request.since:
            dated.append(("_lastUpdated", "ge" + self.request.since))
        if self.request.until:
            dated.append(("_lastUpdated", "le" + self.request.until))
        filters = self.request.type_filters.get(rtype) or [[]]
        streams = [
            tx.iter_search(
                rtype,
                [*dated, *type_filter, *criteria],
                batch=self.batch_size,
                max_bytes=self.batch_max_bytes,
                where=where,
                compartment=self._compartment() if compartment else None,
            )
            for type_filter in filters
        ]
        if len(streams) == 1:
            yield from streams[0]
            return
        last = -1
        for stored in heapq.merge(*streams, key=lambda s: s.pid):
            if stored.pid != last:  # _typeFilter searches are OR'ed: a match once
                last = stored.pid
                yield stored

    def _associated(self, tx: Tx) -> Iterator[StoredResource]:
        """The Provenance whose ``target`` is one of the resources this job exports
        (``RelevantProvenanceResources``), in pid order, batch by batch."""
        pending: list[StoredResource] = []
        for stored in self._resources(tx, "Provenance", compartment=False):
            pending.append(stored)
            if len(pending) >= self.batch_size:
                yield from self._of_exported(tx, pending)
                pending = []
        yield from self._of_exported(tx, pending)

    def _of_exported(self, tx: Tx, batch: list[StoredResource]) -> Iterator[StoredResource]:
        """Those of ``batch`` (Provenance) with a target that the job's other types export:
        the same search as theirs, narrowed to the targets' ids."""
        exported = set(self.state["plan"]) - {"Provenance"}
        targets: dict[int, set[tuple[str, str]]] = {}
        wanted: dict[str, set[str]] = defaultdict(set)
        for stored in batch:
            refs = set()
            for target in stored.resource.get("target") or []:
                rtype, rid, _ = parse_reference(str(target.get("reference") or ""))
                if rtype in exported and rid:
                    refs.add((rtype, rid))
                    wanted[rtype].add(rid)
            targets[stored.pid] = refs
        found: set[tuple[str, str]] = set()
        step = current_limits().max_values
        for rtype, ids in wanted.items():
            listed = sorted(ids)
            for start in range(0, len(listed), step):
                criteria = [("_id", ",".join(listed[start : start + step]))]
                matches = self._resources(tx, rtype, after=0, criteria=criteria)
                found.update((rtype, match.res_id) for match in matches)
        for stored in batch:
            if targets[stored.pid] & found:
                yield stored

    def _line(self, tx: Tx, stored: StoredResource) -> bytes | Iterator[bytes]:
        """One NDJSON line: the stored JSON as it is (a blob-backed Binary with its data
        streamed in), or subsetted per ``_elements``."""
        elements = [
            e for e in self.request.elements if "." not in e or e.startswith(stored.res_type + ".")
        ]
        if elements:
            return orjson.dumps(shape(stored.resource, None, elements))
        content = stored.content or b"{}"
        if stored.res_type == "Binary":
            blob = tx.blob_of(stored)
            if blob is not None:
                return self.blobs.json_with_data(content, blob.sha256)
        return content

    # -- checkpoints ------------------------------------------------------------------------------

    def _commit(self, writer: PartWriter, kind: str, listing: str) -> None:
        writer.commit()
        self.state[listing].append({"type": kind, "name": writer.final.name, "count": writer.count})
        self.state["part"] += 1
        if listing == "output":
            self.state["exported"] += writer.count
        self.lease.save(self.state, exported=self.state["exported"])

    def _next_step(self) -> None:
        self.state["step"] += 1
        self.state["after"] = 0
        self.lease.save(self.state)

    def _write_error(self, rtype: str, err: FhirError) -> None:
        writer = self.store.open_part(self.job.id, part_name(ERROR, self.state["part"]))
        outcome = err.to_outcome()
        for issue in outcome.get("issue") or []:
            issue.setdefault("diagnostics", f"{rtype} was not exported")
        writer.write_line(orjson.dumps(outcome))
        self._commit(writer, "OperationOutcome", "error")

    def _export_deleted(self) -> None:
        """``deleted``: a transaction Bundle with a DELETE entry per resource deleted since
        ``_since`` (https://hl7.org/fhir/uv/bulkdata/STU3/export.html#response---complete-status)."""
        since = _instant(self.request.since)
        until = _instant(self.request.until) if self.request.until else None
        writer: PartWriter | None = None
        with self.repo.unit(caller=self.caller, snapshot=False) as tx:
            gone = bulk_reads.iter_deleted(
                tx, self.state["plan"], since=since, until=until, bound=self.state["bound"],
                after=self.state["after"], batch=self.batch_size,
            )  # fmt: skip
            for item in gone:
                if writer is None:
                    writer = self.store.open_part(
                        self.job.id, part_name(DELETED, self.state["part"])
                    )
                writer.write_line(orjson.dumps(_deletion(item)))
                self.state["after"] = item.pid
                if writer.size >= self.file_max_bytes:
                    self._commit(writer, "Bundle", "deleted")
                    writer = None
        if writer is not None:
            self._commit(writer, "Bundle", "deleted")
        self.state["deleted_done"] = True
        self.lease.save(self.state)


def _deletion(item: bulk_reads.DeletedResource) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "meta": {"lastUpdated": format_instant(item.last_updated)},
        "entry": [{"request": {"method": "DELETE", "url": f"{item.res_type}/{item.res_id}"}}],
    }


def _instant(text: str | None) -> datetime:
    return datetime.fromisoformat((text or "").replace("Z", "+00:00"))
