"""Bulk Data ``$export`` of a whole PostgreSQL store vs ``COPY … TO STDOUT`` of the same rows.

``python -m bench export`` creates a throw-away PostgreSQL database, loads ``--resources``
resources of MSO shapes (a directory of Organizations, Practitioners and PractitionerRoles, then
per patient: Patient, the case ServiceRequest and its Task, an Encounter, Conditions,
Observations, DocumentReferences, the intake QuestionnaireResponse and a Consent) through the
server's own write path (``Repository.write`` with ``Tx.batched_writes``, as a transaction
Bundle of PUTs does: validation, search index and access rows), in parallel processes. Then:

* the baseline: the same rows read by a plain ``COPY (SELECT content FROM resource WHERE …)
  TO STDOUT`` over psycopg, written to a file: once as ``bytea`` in binary format (the raw
  bytes) and once as text (``convert_from``: exactly NDJSON lines), before and after the export
  (the faster run of each counts, so the export is compared with COPY at its best);
* the export: ``mso serve`` on a free loopback port with ``MSO_BULK_WORKER=false`` and one
  separate ``mso worker`` process; a system-level kick-off (``GET /fhir/$export`` with
  ``Prefer: respond-async``, ``_type`` = the loaded types, so that both sides cover the same
  rows) with a backend-services token, the status polled until the manifest; timed from the
  kick-off to the manifest, with the worker's peak RSS (``VmHWM`` of ``/proc/<pid>/status``)
  and the CPU of the worker and of PostgreSQL; then every file downloaded and its lines counted
  against what was loaded.

Targets on the 2-core machine (issue 17): at least 10,000 resources/s and a worker peak RSS
under 300 MB. Spec: https://hl7.org/fhir/uv/bulkdata/STU3/export.html
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    CpuShares,
    CpuWatch,
    backend_pids,
    fmt_rate,
    fmt_ratio,
    fmt_share,
    format_table,
    fresh_database,
    mint_system_token,
    psycopg_dsn,
    run_benchmark,
    running_server,
)

DEFAULT_RESOURCES = 500_000
MAX_RESOURCES = 5_000_000
TARGET_RATE = 10_000.0  # resources/s
TARGET_RSS_MB = 300.0
PER_PATIENT = 20  # resources of one patient's case (see patient_resources)
MB = 1_000_000
NDJSON = "application/fhir+ndjson"


# -- test data --------------------------------------------------------------------------------

CANON = "https://mso.example.org/fhir"
_CS = f"{CANON}/CodeSystem"
_SPECIALTIES = [
    "internal-medicine",
    "oncology",
    "surgery",
    "neurology",
    "dermatology",
    "radiology",
    "pediatrics",
    "urology",
    "ophthalmology",
    "clinical-genetics",
]
_DISEASES = [
    "cancer",
    "cardiovascular",
    "neurological",
    "respiratory",
    "digestive",
    "endocrine-metabolic",
]
_STATUSES = [
    ("new", "requested"),
    ("assigned", "ready"),
    ("accepted", "accepted"),
    ("in-progress", "in-progress"),
    ("done", "completed"),
]
_FAMILY = [
    "Haddad",
    "Farouk",
    "Nasser",
    "Mansour",
    "Khalil",
    "Saleh",
    "Rahman",
    "Mueller",
    "Schmidt",
    "Weber",
    "Garcia",
    "Martin",
    "Rossi",
    "Novak",
    "Kowalski",
    "Johnson",
    "Brown",
    "Yilmaz",
]
_GIVEN = [
    "Omar",
    "Amira",
    "Layla",
    "Yusuf",
    "Sara",
    "Karim",
    "Lena",
    "Jonas",
    "Maria",
    "Ali",
    "Nora",
]
_CITIES = [("Riyadh", "SA"), ("Jeddah", "SA"), ("Dubai", "AE"), ("Berlin", "DE"), ("Cairo", "EG")]
# LOINC code, display, unit, low, high
_LABS = [
    ("8867-4", "Heart rate", "/min", 50, 120),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 95, 180),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 55, 110),
    ("8310-5", "Body temperature", "Cel", 36, 39.5),
    ("29463-7", "Body weight", "kg", 40, 120),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 65, 240),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 9, 17.5),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.5, 11),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.5, 2.5),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 3, 15),
]
_CONDITIONS = [
    ("363346000", "Malignant neoplastic disease"),
    ("38341003", "Hypertensive disorder"),
    ("44054006", "Diabetes mellitus type 2"),
    ("195967001", "Asthma"),
    ("49436004", "Atrial fibrillation"),
    ("13645005", "Chronic obstructive lung disease"),
]
_QUESTIONS = [
    "Is the proposed chemotherapy regimen appropriate given the staging and comorbidities?",
    "Please review the MRI findings and advise whether surgery is indicated at this stage.",
    "Second opinion requested on the diagnosis and the treatment plan before the next cycle.",
]

N_ORGS = 4
N_PRACTITIONERS = 20
DIRECTORY_SIZE = N_ORGS + 2 * N_PRACTITIONERS


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _ref(res_type: str, res_id: str) -> dict[str, str]:
    return {"reference": f"{res_type}/{res_id}"}


def directory_resources() -> list[dict[str, Any]]:
    """The Organizations (hospitals, an insurer, a health authority), Practitioners and
    PractitionerRoles the cases refer to."""
    kinds = [
        ("prov", "Riverside General Hospital"),
        ("prov", "Al Noor Specialist Hospital"),
        ("pay", "Gulf Health Insurance"),
        ("govt", "Ministry of Health"),
    ]
    out: list[dict[str, Any]] = [
        {
            "resourceType": "Organization",
            "id": f"bx-org-{i}",
            "identifier": [{"system": f"{CANON}/sid/organization", "value": f"ORG-{i}"}],
            "active": True,
            "type": [_concept("http://terminology.hl7.org/CodeSystem/organization-type", kind)],
            "name": name,
        }
        for i, (kind, name) in enumerate(kinds)
    ]
    for i in range(N_PRACTITIONERS):
        family, given = _FAMILY[i % len(_FAMILY)], _GIVEN[i % len(_GIVEN)]
        out.append(
            {
                "resourceType": "Practitioner",
                "id": f"bx-pr-{i}",
                "identifier": [{"system": f"{CANON}/sid/practitioner", "value": f"PR-{i}"}],
                "active": True,
                "name": [{"family": family, "given": [given], "prefix": ["Dr."]}],
            }
        )
        out.append(
            {
                "resourceType": "PractitionerRole",
                "id": f"bx-prr-{i}",
                "identifier": [{"system": f"{CANON}/sid/practitioner-role", "value": f"PRR-{i}"}],
                "active": True,
                "practitioner": _ref("Practitioner", f"bx-pr-{i}"),
                "organization": _ref("Organization", f"bx-org-{i % 2}"),
                "code": [
                    _concept("http://terminology.hl7.org/CodeSystem/practitioner-role", "doctor")
                ],
                "specialty": [_concept(f"{_CS}/specialty", _SPECIALTIES[i % len(_SPECIALTIES)])],
                "availableTime": [
                    {
                        "daysOfWeek": ["mon", "tue", "wed", "thu", "fri"],
                        "availableStartTime": "08:00:00",
                        "availableEndTime": "17:00:00",
                    }
                ],
            }
        )
    return out


def _day(rng: random.Random, start: int = 2019, end: int = 2025) -> str:
    return f"{rng.randint(start, end)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def patient_resources(n: int) -> list[dict[str, Any]]:
    """The 20 resources of patient ``n`` and its second-opinion case, deterministic in ``n``."""
    rng = random.Random(n)
    pat = f"bx-pat-{n}"
    subject = _ref("Patient", pat)
    sr_id, task_id, enc_id = f"bx-sr-{n}", f"bx-task-{n}", f"bx-enc-{n}"
    requester = _ref("PractitionerRole", f"bx-prr-{rng.randrange(N_PRACTITIONERS)}")
    provider = _ref("PractitionerRole", f"bx-prr-{rng.randrange(N_PRACTITIONERS)}")
    city, country = rng.choice(_CITIES)
    family, given = rng.choice(_FAMILY), rng.choice(_GIVEN)
    specialty, disease = rng.choice(_SPECIALTIES), rng.choice(_DISEASES)
    status, task_status = rng.choice(_STATUSES)
    authored = _day(rng, 2023)
    out: list[dict[str, Any]] = [
        {
            "resourceType": "Patient",
            "id": pat,
            "identifier": [
                {"use": "usual", "system": f"{CANON}/sid/mrn", "value": f"MRN-{n:08d}"},
                {"system": f"{CANON}/sid/national-id", "value": f"{1_000_000_000 + n}"},
            ],
            "active": True,
            "name": [{"use": "official", "family": family, "given": [given]}],
            "telecom": [
                {"system": "phone", "value": f"+966 5{n % 10} {n:07d}", "use": "mobile"},
                {"system": "email", "value": f"{given.lower()}.{n}@example.org"},
            ],
            "gender": rng.choice(["male", "female"]),
            "birthDate": _day(rng, 1935, 2015),
            "address": [
                {
                    "use": "home",
                    "line": [f"{rng.randint(1, 300)} King Fahd Road"],
                    "city": city,
                    "postalCode": f"{rng.randint(10000, 99999)}",
                    "country": country,
                }
            ],
            "managingOrganization": _ref("Organization", f"bx-org-{n % 2}"),
        },
        {
            "resourceType": "ServiceRequest",
            "id": sr_id,
            "identifier": [
                {"system": f"{CANON}/sid/case-number", "value": f"CASE-{n % 1_000_000:06d}"}
            ],
            "status": "active",
            "intent": "order",
            "priority": rng.choice(["routine", "urgent"]),
            "category": [_concept(f"{_CS}/case-category", "second-opinion")],
            "code": _concept(f"{_CS}/specialty", specialty),
            "subject": subject,
            "authoredOn": authored,
            "requester": requester,
            "performer": [provider],
            "supportingInfo": [_ref("DocumentReference", f"bx-doc-{n}-{d}") for d in range(2)]
            + [_ref("QuestionnaireResponse", f"bx-qr-{n}")],
            "note": [{"text": rng.choice(_QUESTIONS)}],
        },
        {
            "resourceType": "Task",
            "id": task_id,
            "status": task_status,
            "intent": "order",
            "code": _concept(f"{_CS}/task-code", "case"),
            "businessStatus": _concept(f"{_CS}/case-status", status),
            "focus": _ref("ServiceRequest", sr_id),
            "basedOn": [_ref("ServiceRequest", sr_id)],
            "for": subject,
            "authoredOn": f"{authored}T09:00:00Z",
            "requester": requester,
            "owner": provider,
            "restriction": {"period": {"end": f"{authored}T23:59:59Z"}},
        },
        {
            "resourceType": "Encounter",
            "id": enc_id,
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": subject,
            "period": {"start": f"{authored}T08:00:00Z", "end": f"{authored}T08:40:00Z"},
            "serviceProvider": _ref("Organization", f"bx-org-{n % 2}"),
        },
    ]
    for c in range(2):
        code, display = rng.choice(_CONDITIONS)
        out.append(
            {
                "resourceType": "Condition",
                "id": f"bx-cond-{n}-{c}",
                "clinicalStatus": _concept(
                    "http://terminology.hl7.org/CodeSystem/condition-clinical", "active"
                ),
                "verificationStatus": _concept(
                    "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"
                ),
                "code": _concept("http://snomed.info/sct", code, display),
                "subject": subject,
                "encounter": _ref("Encounter", enc_id),
                "onsetDateTime": _day(rng, 2005, 2023),
            }
        )
    for o in range(10):
        code, display, unit, low, high = _LABS[o]
        effective = f"{_day(rng)}T{rng.randint(7, 18):02d}:{rng.randint(0, 59):02d}:00Z"
        out.append(
            {
                "resourceType": "Observation",
                "id": f"bx-obs-{n}-{o}",
                "status": "final",
                "category": [
                    _concept(
                        "http://terminology.hl7.org/CodeSystem/observation-category",
                        "vital-signs" if o < 5 else "laboratory",
                    )
                ],
                "code": _concept("http://loinc.org", code, display),
                "subject": subject,
                "encounter": _ref("Encounter", enc_id),
                "effectiveDateTime": effective,
                "valueQuantity": {
                    "value": round(rng.uniform(low, high), 1),
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                },
                "referenceRange": [
                    {"low": {"value": low, "unit": unit}, "high": {"value": high, "unit": unit}}
                ],
            }
        )
    for d, (category, title) in enumerate(
        (("doctors-letter", "Referral letter"), ("lab-report", "Lab results"))
    ):
        out.append(
            {
                "resourceType": "DocumentReference",
                "id": f"bx-doc-{n}-{d}",
                "status": "current",
                "category": [_concept(f"{_CS}/document-category", category)],
                "subject": subject,
                "date": f"{authored}T10:00:00Z",
                "author": [requester],
                "description": title,
                "content": [
                    {
                        "attachment": {
                            "contentType": "application/pdf",
                            "title": f"{category}.pdf",
                            "url": f"https://dms.hospital.example/documents/{n}/{d}",
                            "size": rng.randint(40_000, 4_000_000),
                        }
                    }
                ],
                "context": {"related": [_ref("ServiceRequest", sr_id)]},
            }
        )
    out.append(
        {
            "resourceType": "QuestionnaireResponse",
            "id": f"bx-qr-{n}",
            "status": "completed",
            "questionnaire": f"{CANON}/Questionnaire/intake",
            "subject": subject,
            "basedOn": [_ref("ServiceRequest", sr_id)],
            "authored": f"{authored}T09:30:00Z",
            "item": [
                {
                    "linkId": "disease-type",
                    "answer": [{"valueCoding": {"system": f"{_CS}/disease-type", "code": disease}}],
                },
                {"linkId": "first-occurrence", "answer": [{"valueDate": _day(rng, 2010, 2023)}]},
                {"linkId": "family-history", "answer": [{"valueBoolean": rng.random() < 0.3}]},
                {
                    "linkId": "current-medications",
                    "answer": [{"valueString": "Metformin 500 mg twice daily"}],
                },
            ],
        }
    )
    out.append(
        {
            "resourceType": "Consent",
            "id": f"bx-consent-{n}",
            "status": "active",
            "scope": _concept(
                "http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"
            ),
            "category": [_concept("http://terminology.hl7.org/CodeSystem/v3-ActCode", "INFAO")],
            "patient": subject,
            "dateTime": f"{authored}T09:00:00Z",
            "policy": [{"uri": f"{CANON}/policy/second-opinion-sharing"}],
            "provision": {
                "type": "permit",
                "actor": [
                    {
                        "role": _concept(
                            "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PRCP"
                        ),
                        "reference": provider,
                    }
                ],
            },
        }
    )
    assert len(out) == PER_PATIENT
    return out


def expected_counts(patients: int) -> dict[str, int]:
    """Resources per type that loading ``patients`` patients (and the directory) stores."""
    counts: dict[str, int] = {}
    for body in directory_resources() + patient_resources(0):
        counts[body["resourceType"]] = counts.get(body["resourceType"], 0) + 1
    return {
        t: c if t in ("Organization", "Practitioner", "PractitionerRole") else c * patients
        for t, c in counts.items()
    }


# -- loading through the repository -----------------------------------------------------------

_REPO: Any = None  # the loading process's repository (see _init_loader)


def _init_loader(database_url: str) -> None:
    """Pool initializer: the repository as the server assembles it (validation, search index
    rows, access rows), with its own connection pool."""
    global _REPO
    from fhir_server.config import Settings
    from fhir_server.wiring import build_repository

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    _REPO = build_repository(Settings(database_url=database_url, db_pool_size=1))


# Written last in a transaction: writing a case (its ServiceRequest or workflow Task) updates
# the case projection, which reads through the unit's connection and so stores every row held
# back so far; with the cases last, the other rows are stored in one go rather than per case.
_CASE_TYPES = ("ServiceRequest", "Task")


def _write_all(tx: Any, bodies: list[dict[str, Any]]) -> int:
    """What a transaction Bundle of PUTs does with its entries: the current rows looked up in
    one statement per type, then every write held back and stored together."""
    absent = tx.prefetch_current([(b["resourceType"], b["id"]) for b in bodies])
    with tx.batched_writes(expected=absent):
        for body in sorted(bodies, key=lambda b: b["resourceType"] in _CASE_TYPES):
            tx.update(body["resourceType"], body["id"], body)
    return len(bodies)


def _load_patients(span: tuple[int, int]) -> int:
    """Store patients ``span[0] .. span[1]-1`` in one transaction; returns the resource count."""
    bodies = [b for n in range(*span) for b in patient_resources(n)]
    return int(_REPO.write(lambda tx: _write_all(tx, bodies)))


def load(
    database_url: str, patients: int, *, per_transaction: int, processes: int, timeout: float
) -> tuple[int, float]:
    """Load the directory, then ``patients`` patients in transactions of about
    ``per_transaction`` resources, ``processes`` at a time. Returns (resources, seconds)."""
    t0 = time.monotonic()
    _init_loader(database_url)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    total = int(_REPO.write(lambda tx: _write_all(tx, directory_resources())))
    _REPO.dispose()
    step = max(1, per_transaction // PER_PATIENT)
    spans = [(s, min(patients, s + step)) for s in range(0, patients, step)]
    deadline = t0 + timeout
    ctx = multiprocessing.get_context("spawn")
    report_every = max(1, len(spans) // 10)
    with ctx.Pool(processes, initializer=_init_loader, initargs=(database_url,)) as pool:
        results = pool.imap_unordered(_load_patients, spans)
        for done in range(1, len(spans) + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"loading took longer than {timeout:.0f} s; giving up")
            try:
                total += results.next(timeout=remaining)
            except multiprocessing.TimeoutError:
                raise RuntimeError(f"loading took longer than {timeout:.0f} s; giving up") from None
            if done % report_every == 0 or done == len(spans):
                took = time.monotonic() - t0
                print(f"  loaded {total:,} resources in {took:.0f} s ({total / took:,.0f}/s)")
                # the statistics autovacuum keeps where it runs (it is off on these machines):
                # planned on empty tables the write path's statements slow down with every row
                analyze(psycopg_dsn(database_url))
    return total, time.monotonic() - t0


def stored_counts(dsn: str, types: list[str]) -> dict[str, int]:
    """Current, not deleted rows per type of ``types`` in the database."""
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT res_type, count(*) FROM resource"
            " WHERE NOT deleted AND res_type = ANY(%s) GROUP BY res_type",
            (types,),
        ).fetchall()
    return {str(t): int(c) for t, c in rows}


def analyze(dsn: str) -> None:
    """``ANALYZE``: fresh planner statistics while the store grows."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("ANALYZE")


def vacuum_analyze(dsn: str) -> None:
    """``VACUUM ANALYZE``: the visibility map and statistics a loaded store would have."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("VACUUM ANALYZE")


# -- the baseline -----------------------------------------------------------------------------


@dataclass
class Run:
    """One timed read of the rows: how many, how many bytes, how long."""

    label: str
    resources: int
    bytes: int
    seconds: float
    peak_rss_mb: float | None = None
    cpu: CpuShares | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Resources per second."""
        return self.resources / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6 bytes) per second."""
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0


def copy_baseline(dsn: str, types: list[str], out: Path, *, binary: bool) -> Run:
    """``COPY (SELECT content FROM resource WHERE …) TO STDOUT`` written to ``out``: binary
    format with the raw ``bytea``, or text with ``convert_from`` (NDJSON lines). Counts rows
    from PostgreSQL's own ``COPY n`` status."""
    import psycopg

    column = "content" if binary else "convert_from(content, 'UTF8')"
    in_list = ", ".join(f"'{t}'" for t in types)  # our own type names, no user input
    query = (
        f"COPY (SELECT {column} FROM resource WHERE NOT deleted AND res_type IN ({in_list}))"
        f" TO STDOUT{' (FORMAT binary)' if binary else ''}"
    )
    written = 0
    with psycopg.connect(dsn, connect_timeout=10) as conn, out.open("wb") as sink:
        cur = conn.cursor()
        t0 = time.monotonic()
        with cur.copy(query) as copy:
            for chunk in copy:
                sink.write(chunk)
                written += len(chunk)
        sink.flush()
        seconds = time.monotonic() - t0
        rows = cur.rowcount
    label = "COPY binary (bytea)" if binary else "COPY text (NDJSON lines)"
    return Run(label, rows, written, seconds)


def best(runs: list[Run]) -> Run:
    """The fastest of several runs of the same read."""
    return min(runs, key=lambda r: r.seconds)


# -- the worker process -----------------------------------------------------------------------


def _worker_command() -> list[str]:
    """``mso worker`` next to this interpreter, else the worker module's ``main``."""
    beside = Path(sys.executable).with_name("mso")
    if beside.exists():
        return [str(beside), "worker"]
    return [
        sys.executable,
        "-c",
        "import sys; from fhir_server.bulk.worker import main; sys.exit(main())",
    ]


def read_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` figure (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status`` (``None`` if gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


class MemoryWatch:
    """Samples a process's ``VmRSS`` and ``VmHWM`` (kernel peak) every ``interval`` seconds in
    a thread, so that the peak is known even if the process dies."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """Read the figures once."""
        for key in ("VmHWM", "VmRSS"):
            value = read_status_kb(self.pid, key)
            if value is not None:
                self.peak_kb = max(self.peak_kb, value)

    def start(self) -> MemoryWatch:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop sampling; the peak in MB (10^6 bytes)."""
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_kb * 1024 / MB


@dataclass
class Worker:
    """A running ``mso worker``."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The worker's PID (the Python process itself)."""
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the worker's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def running_worker(database_url: str, env: dict[str, str]) -> Iterator[Worker]:
    """Start ``mso worker`` on ``database_url``; stopped (SIGTERM, then SIGKILL) at the end."""
    fd, name = tempfile.mkstemp(prefix="mso-bench-worker-", suffix=".log")
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["MSO_DATABASE_URL"] = database_url
    process = subprocess.Popen(
        _worker_command(),
        stdout=fd,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        start_new_session=True,
    )
    os.close(fd)
    worker = Worker(process, Path(name))
    try:
        yield worker
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        with contextlib.suppress(OSError):
            worker.log_path.unlink()


def wait_idle(worker: Worker, timeout: float = 60.0) -> float:
    """Wait until the worker has started (imports done, CPU quiet for a second); returns the
    seconds it took. The export's clock then measures the export, not the start-up."""
    from bench.common import process_cpu_seconds

    t0 = time.monotonic()
    last, quiet = process_cpu_seconds(worker.pid), 0
    while time.monotonic() - t0 < timeout:
        time.sleep(0.25)
        if worker.process.poll() is not None:
            raise RuntimeError(
                f"the worker exited with status {worker.process.returncode}:\n{worker.log_tail()}"
            )
        now = process_cpu_seconds(worker.pid)
        quiet = quiet + 1 if now is not None and last is not None and now - last < 0.02 else 0
        last = now
        if quiet >= 4 and time.monotonic() - t0 > 1.0:
            break
    return time.monotonic() - t0


# -- HTTP -------------------------------------------------------------------------------------


def request(
    method: str, url: str, token: str, *, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    """One request with the bearer token; returns (status, headers, body)."""
    req = urllib.request.Request(url, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def kick_off(base_url: str, token: str, types: list[str]) -> str:
    """``GET [base]/$export?_type=…`` with ``Prefer: respond-async``; the status URL."""
    query = urllib.parse.urlencode({"_type": ",".join(types), "_outputFormat": NDJSON})
    status, headers, body = request(
        "GET",
        f"{base_url}/$export?{query}",
        token,
        headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
    )
    location = {k.lower(): v for k, v in headers.items()}.get("content-location")
    if status != 202 or not location:
        raise RuntimeError(f"kick-off answered {status}: {body[:2000].decode(errors='replace')}")
    return location


def wait_manifest(
    status_url: str, token: str, *, deadline: float, worker: Worker, interval: float = 0.1
) -> tuple[dict[str, Any], str]:
    """Poll the status URL until the manifest (200); returns it and the last ``X-Progress``."""
    progress = ""
    while True:
        status, headers, body = request("GET", status_url, token)
        if status == 200:
            return orjson.loads(body), progress
        if status != 202:
            raise RuntimeError(f"status answered {status}: {body[:2000].decode(errors='replace')}")
        progress = {k.lower(): v for k, v in headers.items()}.get("x-progress", progress)
        if worker.process.poll() is not None:
            raise RuntimeError(
                f"the worker exited with status {worker.process.returncode} during the export "
                f"(last progress: {progress}):\n{worker.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"no manifest before the timeout (last progress: {progress!r})")
        time.sleep(interval)


def download(
    manifest: dict[str, Any], token: str, *, deadline: float
) -> tuple[dict[str, int], int]:
    """Fetch every output file, streamed; returns the lines per type and the bytes. Each
    file's first and last line must parse as a resource of the file's type."""
    counts: dict[str, int] = {}
    total = 0
    for item in manifest.get("output", []):
        req = urllib.request.Request(item["url"])
        req.add_header("Authorization", f"Bearer {token}")
        # no Accept header (optional in the IG): ``Accept: application/fhir+ndjson`` is a 406
        lines, first, tail = 0, b"", b""
        remaining = max(1.0, deadline - time.monotonic())
        with urllib.request.urlopen(req, timeout=remaining) as resp:
            while chunk := resp.read(1 << 20):
                total += len(chunk)
                lines += chunk.count(b"\n")
                if not first:
                    first = chunk.split(b"\n", 1)[0]
                tail = (tail + chunk)[-(1 << 20) :]
                if time.monotonic() > deadline:
                    raise RuntimeError("downloading took longer than the timeout")
        if tail and not tail.endswith(b"\n"):
            lines += 1
        last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        for line in {first, last} - {b""}:
            if orjson.loads(line).get("resourceType") != item["type"]:
                raise RuntimeError(f"a line of {item['url']} is not a {item['type']}")
        if lines != int(item.get("count", lines)):
            raise RuntimeError(f"{item['url']}: {lines} lines, the manifest says {item['count']}")
        counts[item["type"]] = counts.get(item["type"], 0) + lines
    return counts, total


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class ExportResult:
    """The export's run, the download's, and what the manifest held."""

    export: Run
    download: Run | None
    files: int
    worker_idle_mb: float
    progress: str


def run_export(
    database_url: str,
    dsn: str,
    types: list[str],
    expected: dict[str, int],
    args: argparse.Namespace,
    work: Path,
) -> ExportResult:
    """The kick-off through ``mso serve``, the job run by a separate ``mso worker``."""
    bulk_dir = work / "bulk"
    bulk_dir.mkdir()
    env = {
        "MSO_BULK_DIR": str(bulk_dir),
        "MSO_BULK_WORKER": "false",
        "MSO_BULK_POLL_INTERVAL": str(args.poll_interval),
        "MSO_BULK_RETENTION_HOURS": "1",
        "MSO_DATA_DIR": str(work / "data"),
    }
    with (
        running_server(database_url, workers=1, extra_env=env) as server,
        running_worker(database_url, env) as worker,
    ):
        token = mint_system_token(database_url, server.base_url)
        started = wait_idle(worker)
        idle_mb = (read_status_kb(worker.pid, "VmRSS") or 0) * 1024 / MB
        print(
            f"Server {server.base_url}; worker pid {worker.pid} idle after {started:.1f} s, "
            f"RSS {idle_mb:.0f} MB"
        )
        memory = MemoryWatch(worker.pid).start()
        cpu = CpuWatch({"worker": lambda: {worker.pid}, "postgres": lambda: backend_pids(dsn)})
        cpu.start()
        t0 = time.monotonic()
        status_url = kick_off(server.base_url, token, types)
        manifest, progress = wait_manifest(
            status_url, token, deadline=t0 + args.timeout, worker=worker
        )
        seconds = time.monotonic() - t0
        shares = cpu.stop()
        peak = memory.stop()
        listed = {t: 0 for t in types}
        for item in manifest.get("output", []):
            listed[item["type"]] = listed.get(item["type"], 0) + int(item.get("count", 0))
        exported = sum(listed.values())
        run = Run(
            "$export (kick-off -> manifest)", exported, tree_bytes(bulk_dir), seconds, peak, shares
        )
        if listed != expected:
            diff = {t: (listed.get(t, 0), n) for t, n in expected.items() if listed.get(t, 0) != n}
            run.notes.append(f"manifest counts differ from the database's: {diff}")
        if manifest.get("error"):
            run.notes.append(f"manifest lists {len(manifest['error'])} error file(s)")
        fetched = None
        if not args.no_download:
            t1 = time.monotonic()
            counts, size = download(manifest, token, deadline=t1 + args.timeout)
            fetched = Run(
                "download (every file over HTTP)", sum(counts.values()), size, time.monotonic() - t1
            )
            if {t: counts.get(t, 0) for t in expected} != expected:
                fetched.notes.append(f"downloaded lines per type differ: {counts}")
        with contextlib.suppress(OSError):
            request("DELETE", status_url, token)
        return ExportResult(run, fetched, len(manifest.get("output", [])), idle_mb, progress)


# -- the run ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m bench export``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench export",
        description="Bulk Data $export (mso worker) vs COPY TO STDOUT of the same rows.",
    )
    parser.add_argument(
        "--resources",
        type=int,
        default=DEFAULT_RESOURCES,
        help=f"resources to load, about (default {DEFAULT_RESOURCES:,}; {PER_PATIENT} a patient)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the export (kick-off to manifest) and the download may take each (600)",
    )
    parser.add_argument(
        "--load-timeout", type=float, default=1800.0, help="seconds loading may take (1800)"
    )
    parser.add_argument(
        "--load-processes", type=int, default=2, help="loading processes (2: one per core)"
    )
    parser.add_argument(
        "--per-transaction", type=int, default=1000, help="resources per loading transaction"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.2,
        help="MSO_BULK_POLL_INTERVAL of the worker: how soon it sees the new job (0.2 s)",
    )
    parser.add_argument(
        "--database-url",
        help="an existing PostgreSQL database loaded by an earlier run (--keep): no load",
    )
    parser.add_argument("--keep", action="store_true", help="do not drop the fresh database")
    parser.add_argument("--no-download", action="store_true", help="skip downloading the files")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not PER_PATIENT <= args.resources <= MAX_RESOURCES:
        parser.error(f"--resources must be within {PER_PATIENT}..{MAX_RESOURCES:,}")
    if not 1 <= args.timeout <= 7200 or not 1 <= args.load_timeout <= 7200:
        parser.error("--timeout and --load-timeout must be within 1..7200 seconds")
    if not 1 <= args.load_processes <= 16:
        parser.error("--load-processes must be within 1..16")
    if not PER_PATIENT <= args.per_transaction <= 20_000:
        parser.error(f"--per-transaction must be within {PER_PATIENT}..20000")
    if not 0.01 <= args.poll_interval <= 10:
        parser.error("--poll-interval must be within 0.01..10 seconds")
    return args


def _environment(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        buffers = conn.execute("SHOW shared_buffers").fetchone()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"PostgreSQL {row[0] if row else '?'} at 127.0.0.1:5432 (shared_buffers "
        f"{buffers[0] if buffers else '?'}); {os.cpu_count()} CPUs; load average {load}"
    )


@dataclass
class Figures:
    """Everything the report prints."""

    resources: int
    bytes_in_db: int
    load_seconds: float | None
    copies: list[Run]
    export: ExportResult
    environment: str


def run(args: argparse.Namespace) -> Figures:
    """Set up, load, measure, tear down; returns the figures."""
    patients = max(1, math.ceil((args.resources - DIRECTORY_SIZE) / PER_PATIENT))
    expected = expected_counts(patients)
    types = sorted(expected)
    with contextlib.ExitStack() as stack:
        if args.database_url:
            url = args.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
        else:
            url = stack.enter_context(fresh_database("mso_bench_export", keep=args.keep))
        dsn = psycopg_dsn(url)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mso-bench-export-")))
        environment = _environment(dsn)
        print(f"Database: {url}\nEnvironment: {environment}")
        load_seconds = None
        if not args.database_url:
            from fhir_server.storage.migrate import upgrade

            upgrade(url)
            print(f"Loading {sum(expected.values()):,} resources ({patients:,} patients) ...")
            _, load_seconds = load(
                url,
                patients,
                per_transaction=args.per_transaction,
                processes=args.load_processes,
                timeout=args.load_timeout,
            )
            vacuum_analyze(dsn)
        stored = stored_counts(dsn, types)
        if stored != expected:
            raise RuntimeError(f"the database holds {stored}, not the expected {expected}")
        total = sum(expected.values())
        copies = [copy_baseline(dsn, types, work / "copy.bin", binary=b) for b in (True, False)]
        copy_bytes = copies[1].bytes
        print("COPY: " + "; ".join(f"{c.label} {c.seconds:.2f} s" for c in copies))
        export = run_export(url, dsn, types, expected, args, work)
        print(
            f"Export: {export.export.seconds:.2f} s, worker peak RSS "
            f"{export.export.peak_rss_mb or 0:.0f} MB"
        )
        copies += [copy_baseline(dsn, types, work / "copy.bin", binary=b) for b in (True, False)]
        print("COPY again: " + "; ".join(f"{c.label} {c.seconds:.2f} s" for c in copies[2:]))
        with contextlib.suppress(OSError):
            (work / "copy.bin").unlink()
        from fhir_server.storage.engine import dispose_all

        dispose_all()
        shutil.rmtree(work / "bulk", ignore_errors=True)
    return Figures(total, copy_bytes, load_seconds, copies, export, environment)


_HEADERS = ["run", "resources", "seconds", "resources/s", "MB/s", "peak RSS MB", "rate / COPY"]


def report(fig: Figures, args: argparse.Namespace) -> str:
    """The printed result: the table, CPU during the export, and the targets."""
    copy_bin = best([c for c in fig.copies if "binary" in c.label])
    copy_txt = best([c for c in fig.copies if "text" in c.label])
    exp, down = fig.export.export, fig.export.download
    out = [
        f"Bulk export benchmark: {fig.resources:,} resources, "
        f"{fig.bytes_in_db / MB:,.0f} MB of NDJSON (MB = 10^6 bytes)",
        f"Environment: {fig.environment}",
    ]
    if fig.load_seconds:
        out.append(
            f"Loaded through Repository.write + Tx.batched_writes in {fig.load_seconds:.0f} s "
            f"({fig.resources / fig.load_seconds:,.0f} resources/s, {args.load_processes} "
            f"processes, {args.per_transaction} resources a transaction)"
        )
    out.append("")
    rows = []
    for r in (copy_bin, copy_txt, exp, *([down] if down else [])):
        rows.append(
            [
                r.label,
                f"{r.resources:,}",
                f"{r.seconds:.2f}",
                fmt_rate(r.rate),
                f"{r.mb_per_s:,.1f}",
                f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "-",
                fmt_ratio(r.rate / copy_bin.rate) if copy_bin.rate else "-",
            ]
        )
    out.append(format_table(_HEADERS, rows, align="lrrrrrr"))
    cpu = exp.cpu
    out += [
        "",
        "COPY: the faster of a run before and one after the export. rate / COPY = resources/s "
        "over those of COPY binary.",
        f"$export: {fig.export.files} file(s); worker RSS idle {fig.export.worker_idle_mb:.0f} MB; "
        f"last X-Progress: {fig.export.progress or '-'}",
    ]
    if cpu is not None:
        out.append(
            f"CPU during the export (% of one core): worker {fmt_share(cpu.groups.get('worker'))}, "
            f"postgres {fmt_share(cpu.groups.get('postgres'))}, machine "
            f"{cpu.machine_busy * 100:.0f}% of {os.cpu_count()} CPUs"
        )
    peak = exp.peak_rss_mb or 0.0
    targets = [
        [
            "resources/s",
            f">= {TARGET_RATE:,.0f}",
            fmt_rate(exp.rate),
            "PASS" if exp.rate >= TARGET_RATE else "below",
        ],
        [
            "worker peak RSS MB",
            f"< {TARGET_RSS_MB:.0f}",
            f"{peak:.0f}",
            "PASS" if 0 < peak < TARGET_RSS_MB else "above",
        ],
        ["ratio export / COPY binary", "(printed)", fmt_ratio(exp.rate / copy_bin.rate), ""],
        ["ratio export / COPY text", "(printed)", fmt_ratio(exp.rate / copy_txt.rate), ""],
    ]
    out += ["", "Targets (issue 17, this 2-core machine):", ""]
    out.append(format_table(["figure", "target", "measured", ""], targets, align="lrrl"))
    for r in (exp, down):
        for note in r.notes if r else ():
            out.append(f"WARNING: {note}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench export [options]``: run the benchmark and print its tables."""
    return run_benchmark(
        _parse_args(argv), run, report, stopped="server and worker stopped, database cleaned up"
    )


if __name__ == "__main__":
    sys.exit(main())
