# ruff: noqa: E501  (data tables and generated SQL read better unwrapped)
"""``python -m bench search``: FHIR search speed on PostgreSQL.

Loads a reproducible synthetic population (patients with encounters, observations, conditions,
service requests and tasks; 19 resources per patient) into a fresh PostgreSQL database in two
stages (``--small`` patients, then ``--patients``), and at each stage prints, per query:
in-process latency p50/p95/p99 of the compiled SQL, its EXPLAIN cost, and the ratio to a
hand-written SQL query over the same tables in the same run. At full size it also runs the
HTTP throughput targets with ``wrk -t1 -c16`` against ``mso serve``, and measures the
index-write cost per created resource (create with vs without index extraction).
Runs are bounded in count and time (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, insert, text
from sqlalchemy.dialects import postgresql

from bench.common import running_server, wrk_header_args
from fhir_server.search.compile import CompileOptions, compile_search, index_driven_criterion
from fhir_server.search.extract import extract_rows
from fhir_server.search.query import parse_query
from fhir_server.search.registry import SearchRegistry
from fhir_server.storage.index_schema import INDEX_TABLES
from fhir_server.storage.schema import resource, resource_history

ADMIN = os.environ.get("MSO_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
FAMILIES = [
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
    "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez",
    "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright",
    "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall",
    "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Müller", "Schmidt", "Schneider",
]  # fmt: skip
GIVEN = ["Anna", "Bob", "Carla", "David", "Eva", "Frank", "Gina", "Hugo", "Ines", "Jon", "Kim"]
LOINC = ["8867-4", "8310-5", "29463-7", "8302-2", "85354-9", "2339-0", "718-7", "4548-4"]
SNOMED = ["38341003", "44054006", "195967001", "49436004", "13645005"]


def population(rng: random.Random, start: int, stop: int) -> Any:
    """Resources of patients ``start .. stop-1`` (19 each), deterministic in the patient number."""
    for n in range(start, stop):
        rng.seed(n)
        pid = f"pat-{n}"
        yield {
            "resourceType": "Patient", "id": pid,
            "identifier": [{"system": "urn:mso:mrn", "value": f"MRN{n}"}],
            "name": [{"family": rng.choice(FAMILIES), "given": [rng.choice(GIVEN)]}],
            "gender": rng.choice(["male", "female"]),
            "birthDate": f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "address": [{"city": rng.choice(["Berlin", "Riyadh", "Paris"]), "country": "XX"}],
        }  # fmt: skip
        subject = {"reference": f"Patient/{pid}"}
        for e in range(2):
            yield {
                "resourceType": "Encounter", "id": f"enc-{n}-{e}", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": subject,
                "period": {"start": f"20{rng.randint(10, 23)}-0{rng.randint(1, 9)}-1{e}T08:00:00Z"},
            }  # fmt: skip
        for o in range(12):
            yield {
                "resourceType": "Observation", "id": f"obs-{n}-{o}", "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": rng.choice(LOINC)}]},
                "subject": subject, "encounter": {"reference": f"Encounter/enc-{n}-{o % 2}"},
                "effectiveDateTime": f"20{rng.randint(10, 23)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:00:00Z",
                "valueQuantity": {"value": round(rng.uniform(30, 200), 1), "unit": "/min",
                                  "system": "http://unitsofmeasure.org", "code": "/min"},
            }  # fmt: skip
        for c in range(2):
            yield {
                "resourceType": "Condition", "id": f"cond-{n}-{c}",
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": rng.choice(SNOMED)}]},
                "subject": subject, "onsetDateTime": f"20{rng.randint(0, 23):02d}-01-01",
            }  # fmt: skip
        yield {
            "resourceType": "ServiceRequest", "id": f"sr-{n}", "status": "active", "intent": "order",
            "identifier": [{"system": "urn:mso:case", "value": f"CASE-{n:06d}"}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "11429006"}]},
            "subject": subject, "authoredOn": "2024-01-01",
        }  # fmt: skip
        yield {
            "resourceType": "Task", "id": f"task-{n}", "status": rng.choice(["requested", "ready", "in-progress"]),
            "intent": "order", "focus": {"reference": f"ServiceRequest/sr-{n}"}, "for": subject,
            "businessStatus": {"coding": [{"system": "urn:mso:status", "code": "new"}]},
        }  # fmt: skip


def bulk_load(conn: Connection, registry: SearchRegistry, resources: Any, batch: int = 2000) -> int:
    """Insert resources, their history rows and their index rows in batches (no REST)."""
    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    total = 0
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        rows = []
        for body in chunk:
            body["meta"] = {"versionId": "1", "lastUpdated": stamp}
            rows.append({
                "res_type": body["resourceType"], "res_id": body["id"], "version": 1,
                "last_updated": now, "deleted": False, "content": orjson.dumps(body),
            })  # fmt: skip
        pids = conn.execute(
            insert(resource).returning(resource.c.pid, sort_by_parameter_order=True), rows
        ).scalars().all()  # fmt: skip
        conn.execute(
            insert(resource_history),
            [{**{k: v for k, v in r.items()}, "pid": p, "method": "POST"} for r, p in zip(rows, pids, strict=True)],
        )  # fmt: skip
        by_table: dict[str, list[dict[str, Any]]] = {}
        for body, pid in zip(chunk, pids, strict=True):
            for table, trows in extract_rows(registry, body).items():
                by_table.setdefault(table, []).extend({"pid": pid, **r} for r in trows)
        for table in INDEX_TABLES:
            if by_table.get(table.name):
                conn.execute(insert(table), by_table[table.name])
        chunk.clear()

    for body in resources:
        chunk.append(body)
        total += 1
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()
    return total


# query name -> (type, params, hand-written SQL)
def queries(n_patients: int, rng: random.Random) -> dict[str, Callable[[], tuple[str, list, str]]]:
    """Benchmark queries, each a factory drawing fresh values."""
    from fhir_server.search.types.token import h_sys_value, h_value

    reg = SearchRegistry.load()
    ident = reg.get("Patient", "identifier").identity("Patient")
    name_id = reg.get("Patient", "name").identity("Patient")
    code_id = reg.get("Observation", "code").identity("Observation")
    subj_id = reg.get("Observation", "subject").identity("Observation")

    def identifier():
        v = f"MRN{rng.randrange(n_patients)}"
        h = h_sys_value(ident, "urn:mso:mrn", v)
        return ("Patient", [("identifier", f"urn:mso:mrn|{v}")],
                f"SELECT r.pid FROM resource r JOIN idx_token t ON t.pid = r.pid WHERE t.hash_sys_value = {h} AND NOT r.deleted LIMIT 21")  # fmt: skip

    def name():
        p = rng.choice(FAMILIES)[:3].lower()
        succ = p[:-1] + chr(ord(p[-1]) + 1)
        return ("Patient", [("name", p)],
                f"SELECT DISTINCT s.pid FROM idx_string s WHERE s.hash_identity = {name_id} AND s.value_norm >= '{p}' AND s.value_norm < '{succ}' ORDER BY s.pid LIMIT 21")  # fmt: skip

    def obs_code_subject():
        n = rng.randrange(n_patients)
        h = h_sys_value(code_id, "http://loinc.org", "8867-4")
        return ("Observation", [("subject", f"Patient/pat-{n}"), ("code", "http://loinc.org|8867-4")],
                f"SELECT t.pid FROM idx_token t JOIN idx_reference f ON f.pid = t.pid WHERE t.hash_sys_value = {h} AND f.hash_identity = {subj_id} AND f.target_id = 'pat-{n}' AND f.target_type = 'Patient' LIMIT 21")  # fmt: skip

    date_id = reg.get("Observation", "date").identity("Observation")
    cond_subject = reg.get("Condition", "subject").identity("Condition")
    cond_code = reg.get("Condition", "code").identity("Condition")
    task_patient = reg.get("Task", "patient").identity("Task")
    task_status = reg.get("Task", "status").identity("Task")

    def obs_date():
        from fhir_server.search.types.date import date_range

        y = rng.randint(2010, 2023)
        low, high = date_range(f"{y}-03-04")
        return ("Observation", [("date", f"{y}-03-04")],
                f"SELECT DISTINCT d.pid FROM idx_date d WHERE d.hash_identity = {date_id} AND d.low >= {low} AND d.low <= {high} AND d.high <= {high} ORDER BY d.pid LIMIT 21")  # fmt: skip

    def chained():
        n = rng.randrange(n_patients)
        return ("Observation", [("subject:Patient.identifier", f"urn:mso:mrn|MRN{n}")],
                f"SELECT f.pid FROM idx_reference f JOIN resource p ON p.res_type = f.target_type AND p.res_id = f.target_id JOIN idx_token t ON t.pid = p.pid WHERE f.hash_identity = {subj_id} AND t.hash_sys_value = {h_sys_value(ident, 'urn:mso:mrn', f'MRN{n}')} LIMIT 21")  # fmt: skip

    def has():
        n = rng.randrange(n_patients)
        h = h_sys_value(ident, "urn:mso:mrn", f"MRN{n}")
        return ("Patient", [("_has:Task:patient:status", "requested"), ("identifier", f"urn:mso:mrn|MRN{n}")],
                f"SELECT t.pid FROM idx_token t WHERE t.hash_sys_value = {h} AND t.pid IN (SELECT p.pid FROM idx_reference f JOIN resource p ON p.res_type = f.target_type AND p.res_id = f.target_id JOIN idx_token s ON s.pid = f.pid WHERE f.hash_identity = {task_patient} AND s.hash_value = {h_value(task_status, 'requested')}) ORDER BY t.pid LIMIT 21")  # fmt: skip

    def has_code():
        p = rng.choice(FAMILIES)[:3].lower()
        succ = p[:-1] + chr(ord(p[-1]) + 1)
        code = rng.choice(SNOMED)
        return ("Patient", [("_has:Condition:subject:code", f"http://snomed.info/sct|{code}"), ("name", p)],
                f"SELECT DISTINCT s.pid FROM idx_string s WHERE s.hash_identity = {name_id} AND s.value_norm >= '{p}' AND s.value_norm < '{succ}' AND s.pid IN (SELECT p.pid FROM idx_reference f JOIN resource p ON p.res_type = f.target_type AND p.res_id = f.target_id JOIN idx_token t ON t.pid = f.pid WHERE f.hash_identity = {cond_subject} AND t.hash_sys_value = {h_sys_value(cond_code, 'http://snomed.info/sct', code)}) ORDER BY s.pid LIMIT 21")  # fmt: skip

    return {
        "Patient?identifier=sys|value": identifier,
        "Patient?name=<3-letter prefix>": name,
        "Observation?subject=..&code=..": obs_code_subject,
        "Observation?date=<day>": obs_date,
        "Observation?subject:Patient.identifier=..": chained,
        "Patient?_has:Condition:subject:code=..&name=..": has_code,
        "Patient?_has:Task:patient:status=..&identifier=..": has,
    }


# hand-written page: the pids from the index query, then the content of those rows
HAND = "SELECT r.pid, r.res_id, r.version, r.last_updated, r.content FROM resource r WHERE r.pid IN ({inner}) AND NOT r.deleted ORDER BY r.pid"
CONTENT = ("res_type", "res_id", "version", "last_updated", "deleted", "content")


def _pct(samples: list[float], q: float) -> float:
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(q * len(samples)))]


def measure(engine: Any, n_patients: int, runs: int) -> None:
    """In-process latency of each compiled query vs its hand-written SQL.

    As in the server, a query that can be driven from one index (``form`` = index) runs in that
    form on a connection keeping generic plans; the others (classic) are planned per run.
    """
    from fhir_server.storage.engine import build_engine

    registry = SearchRegistry.load()
    rng = random.Random(1)
    generic = build_engine(engine.url.render_as_string(hide_password=False), generic_plans=True)
    print(
        f"{'query':52} {'form':>7} {'p50ms':>7} {'p95ms':>7} {'p99ms':>7} {'cost':>9} "
        f"{'hand p50':>9} {'ratio':>6}"
    )
    for label, make in queries(n_patients, rng).items():
        ours, hand, cost, form = [], [], 0.0, "classic"
        with engine.connect() as conn, generic.connect() as planned_once:
            for i in range(runs):
                rtype, params, sql = make()
                q = parse_query(registry, (rtype,), params)
                driven = index_driven_criterion(registry, q, CompileOptions()) is not None
                form = "index" if driven else "classic"
                stmt = compile_search(
                    registry, q, CompileOptions(index_driven=driven), limit=21, columns=CONTENT
                ).statement
                t0 = time.perf_counter()
                (planned_once if driven else conn).execute(stmt).all()
                ours.append((time.perf_counter() - t0) * 1000)
                if i == 0:
                    compiled = stmt.compile(
                        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
                    )
                    plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {compiled}")).scalar()
                    cost = plan[0]["Plan"]["Total Cost"]
                t0 = time.perf_counter()
                conn.execute(text(HAND.format(inner=sql))).all()
                hand.append((time.perf_counter() - t0) * 1000)
        h50 = statistics.median(hand)
        ratio = statistics.median(ours) / h50
        print(f"{label:52} {form:>7} {statistics.median(ours):7.2f} {_pct(ours, .95):7.2f} "
              f"{_pct(ours, .99):7.2f} {cost:9.1f} {h50:9.2f} {ratio:6.2f}")  # fmt: skip
    generic.dispose()


def write_cost(engine: Any, count: int) -> None:
    """Create Patients + Observations through the repository, alternating with and without
    index extraction (interleaved, so load drift on a shared machine hits both alike)."""
    from fhir_server.storage import indexer
    from fhir_server.storage.repository import Repository

    registry = SearchRegistry.load()
    repo = Repository(engine, registry=registry)
    rng = random.Random(5)
    start = 900000 + rng.randrange(10**6)
    bodies = [
        b
        for b in population(rng, start, start + count)
        if b["resourceType"] in ("Patient", "Observation")
    ]
    real = indexer.index_rows

    def no_rows(registry: SearchRegistry, resource: dict[str, Any]) -> Any:
        return {}

    timings: dict[bool, list[float]] = {True: [], False: []}
    for i, body in enumerate(bodies * 2):
        with_index = i % 2 == 0
        body = dict(body)
        body.pop("id", None)
        indexer.index_rows = real if with_index else no_rows  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            repo.write(lambda tx, b=body: tx.create(b))
            timings[with_index].append((time.perf_counter() - t0) * 1000)
        finally:
            indexer.index_rows = real  # type: ignore[assignment]
    base, with_ix = statistics.median(timings[False]), statistics.median(timings[True])
    extract_t0 = time.perf_counter()
    for body in bodies:
        extract_rows(registry, body)
    extract_ms = (time.perf_counter() - extract_t0) / len(bodies) * 1000
    print(f"create (median) without index {base:.2f} ms, with index {with_ix:.2f} ms "
          f"(+{(with_ix / base - 1) * 100:.0f}%), extraction alone {extract_ms:.2f} ms")  # fmt: skip


def wrk(url: str, n_patients: int, seconds: int) -> None:
    """HTTP throughput and latency of the two targets with wrk -t1 -c16 (after a 2 s warm-up)."""
    if shutil.which("wrk") is None:
        print("wrk not installed: HTTP figures skipped")
        return
    families = ",".join(f'"{f[:3].lower()}"' for f in FAMILIES if f.isascii())
    scripts = {
        "Patient/<id> (read, the stack's baseline)": (
            f'request = function() return wrk.format("GET", "/fhir/Patient/pat-" .. math.random(0, {n_patients - 1})) end'
        ),
        "Patient?identifier=sys|value": (
            f'request = function() return wrk.format("GET", "/fhir/Patient?identifier=urn:mso:mrn%7CMRN" .. math.random(0, {n_patients - 1})) end'
        ),
        "Patient?name=<3-letter prefix>": (
            f"local f = {{{families}}}\n"
            'request = function() return wrk.format("GET", "/fhir/Patient?name=" .. f[math.random(#f)]) end'
        ),
    }  # fmt: skip
    for label, script in scripts.items():
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
            fh.write(script + "\n")
        # 2 s of the same requests first, not counted: every worker's connection pools, plan
        # caches and statement caches are then warm, as on a server that has been running
        subprocess.run(
            ["wrk", *wrk_header_args(), "-t1", "-c16", "-d2s", "-s", fh.name, url],
            capture_output=True, timeout=40,
        )  # fmt: skip
        out = subprocess.run(
            ["wrk", *wrk_header_args(), "-t1", "-c16", f"-d{seconds}s", "--latency", "-s", fh.name, url],
            capture_output=True, text=True, timeout=seconds + 30,
        ).stdout  # fmt: skip
        rps = next(
            (line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")), "?"
        )
        lat = {
            p: line.split()[1]
            for line in out.splitlines()
            for p in ("50%", "99%")
            if line.strip().startswith(p)
        }
        errors = [
            line.strip()
            for line in out.splitlines()
            if "Non-2xx" in line or "Socket errors" in line
        ]
        print(
            f"HTTP {label:40} {rps:>9} req/s  p50 {lat.get('50%')}  p99 {lat.get('99%')} {' '.join(errors)}"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench search``."""
    ap = argparse.ArgumentParser(prog="python -m bench search")
    ap.add_argument(
        "--patients", type=int, default=10500, help="patients at full size (19 resources each)"
    )
    ap.add_argument("--small", type=int, default=1050, help="patients at the small stage")
    ap.add_argument("--runs", type=int, default=200, help="executions per query and stage")
    ap.add_argument("--wrk-seconds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes for HTTP")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    ap.add_argument("--database", help="measure an already loaded (--keep) database; no load")
    args = ap.parse_args(argv)

    import psycopg

    from fhir_server.storage.engine import build_engine
    from fhir_server.storage.migrate import upgrade

    name = args.database or f"mso_bench_{uuid.uuid4().hex[:8]}"
    if args.database:
        args.keep = True
    else:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    try:
        engine = build_engine(url)
        registry = SearchRegistry.load()
        rng = random.Random(42)
        loaded = 0
        stages = () if args.database else (args.small, args.patients)
        if args.database:
            measure(engine, args.patients, args.runs)
        else:
            upgrade(url)
        for stage in stages:
            t0 = time.perf_counter()
            with engine.begin() as conn:
                loaded += bulk_load(conn, registry, population(rng, loaded // 19, stage))
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
            print(
                f"\n== {loaded} resources ({stage} patients), loaded in {time.perf_counter() - t0:.0f}s"
            )
            measure(engine, stage, args.runs)
        write_cost(engine, 60)
        with running_server(url, workers=args.workers) as live:
            print(
                f"HTTP: mso serve with {args.workers} worker(s), wrk -t1 -c16 -d{args.wrk_seconds}s"
                " (after 2 s of warm-up)"
            )
            wrk(live.base_url.removesuffix("/fhir"), args.patients, args.wrk_seconds)
        engine.dispose()
    finally:
        if not args.keep:
            from fhir_server.storage.engine import dispose_all

            dispose_all()
            with psycopg.connect(ADMIN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            print(f"kept database {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
