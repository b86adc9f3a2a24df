"""The table of Bulk Data export jobs (:mod:`fhir_server.bulk`): a queue in the database.

One row a kick-off (https://hl7.org/fhir/uv/bulkdata/STU3/export.html). ``status`` moves
``queued`` -> ``running`` (claimed by one worker under a lease) -> ``completed`` | ``failed``;
``cancelled`` when the client deleted it. A running row whose ``lease_until`` has passed
belongs to a worker that died: another one claims it and resumes from ``checkpoint``, the
progress committed with each finished output file. ``attempts`` counts claims and is the
fencing token of a claim: a worker whose lease was taken over can no longer write the row.

``client_key`` says whose job it is (``client:<id>`` or ``user:<name>``): only the same client
polls, downloads or cancels it. ``principal`` is the caller the export runs as (the access
policy applies to it exactly as to a search), ``request`` the parsed kick-off, ``snapshot_pid``
the largest resource pid at the start: resources created later are not part of the export.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, String, Table, Text

from fhir_server.storage.base_schema import metadata

bulk_job = Table(
    "bulk_job",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("client_key", String(200), nullable=False),
    Column("principal", Text, nullable=False),
    Column("request", Text, nullable=False),
    Column("request_url", Text, nullable=False),
    Column("transaction_time", DateTime(timezone=True), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("finished", DateTime(timezone=True), nullable=True),
    Column("expires", DateTime(timezone=True), nullable=True),
    Column("snapshot_pid", BigInteger, nullable=True),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("checkpoint", Text, nullable=True),
    Column("exported", BigInteger, nullable=False),
    Column("estimate", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
    Index(None, "status", "lease_until"),
    Index(None, "client_key", "status"),
)
