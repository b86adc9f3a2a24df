"""FHIR Bulk Data export (https://hl7.org/fhir/uv/bulkdata/STU3/export.html), usable by
clients of the 2.0 IG too.

:mod:`.request` parses a kick-off; :mod:`.service` queues it, reports its status and manifest
(:mod:`.manifest`), cancels it and hands out its files; :mod:`.jobs` is the queue in the
database; :mod:`.worker` runs jobs (``mso worker`` processes, or a thread of ``mso serve``)
with :mod:`.export`, which writes the NDJSON files of :mod:`.files`. What a job exports is what
its caller may read, by the same access filter as a search; chat never leaves.
"""
