"""Patient read/create/update through the server (wrk) vs the same work as raw SQL (psycopg).

The benchmark creates a throw-away PostgreSQL database (or uses ``--database-url``), starts
``mso serve`` on it, seeds ``--patients`` Patients with transaction Bundles, then measures, at
each concurrency (default 1 and 16):

* read:   ``GET /fhir/Patient/<random seeded id>``
* create: ``POST /fhir/Patient`` with a realistic Patient
* update: ``PUT /fhir/Patient/<random seeded id>`` with that Patient's body (one field changed)

and, as the baseline, the same operations as raw SQL over psycopg 3 against the same database
(one thread and connection per client): a ``SELECT content`` by type and id; an ``INSERT`` into
``resource`` and ``resource_history`` in one transaction; an ``UPDATE`` of ``resource`` plus an
``INSERT`` into ``resource_history`` in one transaction. The server does more than the baseline
(validation, search index rows, version checks, HTTP), so the ratio is the price of all that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    CpuShares,
    CpuWatch,
    Measurement,
    backend_pids,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    fmt_share,
    format_table,
    fresh_database,
    http_json,
    machine_state,
    process_tree,
    psycopg_dsn,
    run_benchmark,
    run_closed_loop,
    run_wrk,
    running_server,
)

OPERATIONS = ("read", "create", "update")
MAX_PATIENTS = 200_000
MAX_DURATION = 120.0
MAX_CONCURRENCY = 64
SEED_TIME_LIMIT = 1800.0  # seconds, all seeding Bundles together
PLACEHOLDER = "__N__"  # replaced by a counter, per request, in create and update bodies


@dataclass(frozen=True)
class Target:
    """A goal for one operation at the highest concurrency (information only)."""

    operation: str
    min_rate: float
    max_p99: float | None = None


TARGETS = (
    Target("read", 2000.0, 25.0),
    Target("create", 600.0),
    Target("update", 500.0),
)
MEDPLUM = "Medplum 4.5.2 on a similar machine: 2,034 reads/s p99 23 ms; 527 creates/s p99 49 ms"


# -- test data --------------------------------------------------------------------------------

_GIVEN_F = ["Anna", "Maria", "Sofia", "Emma", "Lea", "Clara", "Julia", "Laura", "Nora", "Ida"]
_GIVEN_M = ["Paul", "Jonas", "Lukas", "Felix", "Noah", "Elias", "David", "Max", "Ben", "Leon"]
_FAMILY = [
    "Mueller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
    "Schulz", "Hoffmann", "Koch", "Richter", "Klein", "Wolf", "Neumann", "Schwarz",
]  # fmt: skip
_CITIES = [
    ("Berlin", "10", "BE"), ("Hamburg", "20", "HH"), ("Munich", "80", "BY"),
    ("Cologne", "50", "NW"), ("Frankfurt", "60", "HE"), ("Stuttgart", "70", "BW"),
    ("Leipzig", "04", "SN"), ("Dresden", "01", "SN"),
]  # fmt: skip
_STREETS = ["Hauptstrasse", "Bahnhofstrasse", "Gartenweg", "Schulstrasse", "Lindenallee"]


def make_patient(
    rng: random.Random, res_id: str | None, mrn: str, phone_suffix: str
) -> dict[str, Any]:
    """A realistic Patient: identifier, name, telecom, gender, birthDate, address."""
    female = rng.random() < 0.5
    given = rng.sample(_GIVEN_F if female else _GIVEN_M, k=rng.choice((1, 1, 2)))
    family = rng.choice(_FAMILY)
    city, postal, state = rng.choice(_CITIES)
    birth = f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if res_id is not None:
        patient["id"] = res_id
    patient.update(
        {
            "identifier": [
                {
                    "use": "usual",
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "MR",
                            }
                        ]
                    },
                    "system": "urn:oid:1.2.276.0.76.4.8",
                    "value": mrn,
                }
            ],
            "active": True,
            "name": [{"use": "official", "family": family, "given": given}],
            "telecom": [
                {"system": "phone", "value": f"+49 30 {phone_suffix}", "use": "home"},
                {
                    "system": "email",
                    "value": f"{given[0].lower()}.{family.lower()}@example.org",
                    "use": "home",
                },
            ],
            "gender": "female" if female else "male",
            "birthDate": birth,
            "address": [
                {
                    "use": "home",
                    "line": [f"{rng.choice(_STREETS)} {rng.randint(1, 150)}"],
                    "city": city,
                    "state": state,
                    "postalCode": f"{postal}{rng.randint(100, 999)}",
                    "country": "DE",
                }
            ],
        }
    )
    return patient


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# -- seeding ----------------------------------------------------------------------------------


def seed(
    base_url: str, count: int, batch: int, rng: random.Random, clients: int = 1
) -> tuple[list[tuple[str, str]], float]:
    """PUT ``count`` new Patients in transaction Bundles of ``batch``, ``clients`` Bundles at a
    time, after ``clients`` Bundles more to warm the server up (each worker's first write pays
    for its connections, prepared statements and caches). Returns ``(id, body)`` pairs of all
    of them, whose bodies carry the ``__N__`` placeholder in the phone number (for the update
    runs), and the seconds the server took for the ``count``: the Bundles are built and
    serialized before the clock starts, so that the load generator's own JSON work (on the
    same two cores) is not counted as import time."""
    seeded: list[tuple[str, str]] = []
    bundles: list[tuple[bytes, int]] = []  # serialized Bundle, number of entries
    total = count + batch * clients
    for start in range(0, total, batch):
        entries, chunk = [], []
        for n in range(start, min(total, start + batch)):
            res_id = str(uuid.uuid4())
            patient = make_patient(rng, res_id, f"MRN-{n:07d}", f"{rng.randint(1000000, 9999999)}")
            entries.append(
                {
                    "fullUrl": f"{base_url}/Patient/{res_id}",
                    "resource": patient,
                    "request": {"method": "PUT", "url": f"Patient/{res_id}"},
                }
            )
            patient_for_update = dict(
                patient, telecom=[dict(patient["telecom"][0]), patient["telecom"][1]]
            )
            patient_for_update["telecom"][0]["value"] = f"+49 30 555{PLACEHOLDER}"
            chunk.append((res_id, _compact(patient_for_update)))
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        bundles.append((orjson.dumps(bundle), len(entries)))
        seeded.extend(chunk)
    deadline = time.monotonic() + SEED_TIME_LIMIT

    def post(item: tuple[bytes, int]) -> None:
        body, size = item
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"seeding took longer than {SEED_TIME_LIMIT:.0f} s; giving up")
        status, answer = http_json("POST", base_url, body, timeout=min(600.0, remaining))
        if status != 200:
            raise RuntimeError(f"seeding transaction failed with {status}: {str(answer)[:2000]}")
        statuses = [e.get("response", {}).get("status", "") for e in answer.get("entry", [])]
        bad = [s for s in statuses if not s.startswith(("200", "201"))]
        if len(statuses) != size or bad:
            raise RuntimeError(f"seeding transaction: unexpected entry statuses {bad[:5]}")

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for done in pool.map(post, bundles[:clients]):
            del done
        t0 = time.monotonic()
        for done in pool.map(post, bundles[clients:]):
            del done
        return seeded, time.monotonic() - t0


def smoke_test(base_url: str, seeded: list[tuple[str, str]], create_body: str) -> None:
    """One request of each kind: a broken endpoint fails loudly here, not as wrk errors."""
    res_id, body = seeded[0]
    checks = [
        ("GET", f"{base_url}/Patient/{res_id}", None, 200),
        ("POST", f"{base_url}/Patient", json.loads(create_body.replace(PLACEHOLDER, "smoke")), 201),
        ("PUT", f"{base_url}/Patient/{res_id}", json.loads(body.replace(PLACEHOLDER, "0")), 200),
    ]
    for method, url, payload, expected in checks:
        status, answer = http_json(method, url, payload, timeout=60)
        if status != expected:
            raise RuntimeError(
                f"{method} {url} answered {status}, not {expected}: {str(answer)[:2000]}"
            )


# -- raw SQL baseline -------------------------------------------------------------------------

_READ_SQL = "SELECT content FROM resource WHERE res_type = %s AND res_id = %s"
_INSERT_RESOURCE = (
    "INSERT INTO resource (res_type, res_id, version, last_updated, deleted, content)"
    " VALUES (%s, %s, 1, %s, false, %s) RETURNING pid"
)
_INSERT_HISTORY = (
    "INSERT INTO resource_history"
    " (pid, version, res_type, res_id, last_updated, deleted, method, content)"
    " VALUES (%s, %s, %s, %s, %s, false, %s, %s)"
)
_UPDATE_RESOURCE = (
    "UPDATE resource SET version = version + 1, last_updated = %s, content = %s"
    " WHERE res_type = %s AND res_id = %s RETURNING pid, version"
)

Worker = tuple[Callable[[], None], Callable[[], None]]


def _instant(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def raw_worker(
    operation: str, dsn: str, seeded: list[tuple[str, str]], create_body: str
) -> Callable[[int], Worker]:
    """A factory of raw-SQL workers for :func:`run_closed_loop` (one connection per thread)."""
    import psycopg

    ids = [res_id for res_id, _ in seeded]
    bodies = [body.encode() for _, body in seeded]
    template = json.loads(create_body)

    def make(index: int) -> Worker:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        rng = random.Random(index * 7919 + os.getpid())
        counter = [0]

        def read() -> None:
            row = conn.execute(_READ_SQL, ("Patient", rng.choice(ids))).fetchone()
            if row is None or row[0] is None:
                raise LookupError("seeded patient not found")

        def create() -> None:
            counter[0] += 1
            res_id, now = str(uuid.uuid4()), datetime.now(UTC)
            body = dict(template, id=res_id, meta={"versionId": "1", "lastUpdated": _instant(now)})
            body["identifier"] = [
                dict(template["identifier"][0], value=f"RAW-{index}-{counter[0]}")
            ]
            content = json.dumps(body, separators=(",", ":")).encode()
            with conn.transaction():
                pid = conn.execute(_INSERT_RESOURCE, ("Patient", res_id, now, content)).fetchone()
                assert pid is not None
                conn.execute(_INSERT_HISTORY, (pid[0], 1, "Patient", res_id, now, "POST", content))

        def update() -> None:
            counter[0] += 1
            i = rng.randrange(len(ids))
            content = bodies[i].replace(PLACEHOLDER.encode(), str(counter[0]).encode())
            now = datetime.now(UTC)
            with conn.transaction():
                row = conn.execute(_UPDATE_RESOURCE, (now, content, "Patient", ids[i])).fetchone()
                if row is None:
                    raise LookupError("seeded patient not found")
                conn.execute(
                    _INSERT_HISTORY, (row[0], row[1], "Patient", ids[i], now, "PUT", content)
                )

        ops = {"read": read, "create": create, "update": update}
        return ops[operation], conn.close

    return make


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Row:
    """Server and baseline figures for one operation at one concurrency."""

    operation: str
    concurrency: int
    server: Measurement
    raw: Measurement | None


def _sqlalchemy_url(url: str) -> str:
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m bench crud``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench crud",
        description="Patient read/create/update throughput and latency: server (wrk) vs raw SQL.",
    )
    parser.add_argument("--patients", type=int, default=10_000, help="Patients to seed (10000)")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per measurement (10; max 120)"
    )
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (2)")
    parser.add_argument(
        "--concurrency",
        default="1,16",
        help="comma-separated client counts (1,16); targets use the last",
    )
    parser.add_argument(
        "--ops", default=",".join(OPERATIONS), help="operations to measure (read,create,update)"
    )
    parser.add_argument("--batch", type=int, default=500, help="Patients per seeding Bundle (500)")
    parser.add_argument(
        "--import-clients",
        type=int,
        default=2,
        help="seeding Bundles posted at a time (2: one per worker)",
    )
    parser.add_argument(
        "--database-url",
        help="use this existing PostgreSQL database instead of a fresh one (the benchmark "
        "migrates it and writes Patients into it; nothing is dropped)",
    )
    parser.add_argument("--keep", action="store_true", help="do not drop the fresh database")
    parser.add_argument("--no-baseline", action="store_true", help="skip the raw SQL runs")
    parser.add_argument("--verbose", action="store_true", help="print wrk's own output too")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    args.ops = [o.strip() for o in str(args.ops).split(",") if o.strip()]
    if not 1 <= args.patients <= MAX_PATIENTS:
        parser.error(f"--patients must be within 1..{MAX_PATIENTS}")
    if not 1 <= args.duration <= MAX_DURATION:
        parser.error(f"--duration must be within 1..{MAX_DURATION:.0f} seconds")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be within 1..16")
    if not 1 <= args.import_clients <= 16:
        parser.error("--import-clients must be within 1..16")
    if not 1 <= args.batch <= 5000:
        parser.error("--batch must be within 1..5000")
    if not args.concurrency or any(not 1 <= c <= MAX_CONCURRENCY for c in args.concurrency):
        parser.error(f"--concurrency values must be within 1..{MAX_CONCURRENCY}")
    unknown = set(args.ops) - set(OPERATIONS)
    if unknown or not args.ops:
        parser.error(f"--ops takes some of {', '.join(OPERATIONS)}")
    return args


def _describe_environment(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    pg = f"PostgreSQL {row[0] if row else '?'}"
    try:
        first = subprocess.run(
            ["/usr/bin/wrk", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
        wrk = first[0].split(" [")[0] if first else "wrk"
    except (OSError, subprocess.SubprocessError):
        wrk = "wrk"
    return f"{pg} at 127.0.0.1:5432; {wrk}; {machine_state()}"


def run(args: argparse.Namespace) -> list[Row]:
    """Set everything up, measure, tear everything down; returns the figures."""
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        if args.database_url:
            url = _sqlalchemy_url(args.database_url)
        else:
            url = stack.enter_context(fresh_database(keep=args.keep))
        dsn = psycopg_dsn(url)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mso-bench-crud-")))
        print(f"Database: {url}")
        args.environment = _describe_environment(dsn)
        print(f"Environment: {args.environment}")

        t0 = time.monotonic()
        server = stack.enter_context(running_server(url, workers=args.workers))
        ready = time.monotonic() - t0
        print(f"Server: {server.base_url} ({args.workers} workers, ready in {ready:.1f} s)")

        rng = random.Random(20240501)
        seeded, took = seed(server.base_url, args.patients, args.batch, rng, args.import_clients)
        print(
            f"Seeded {args.patients:,} Patients in {took:.1f} s "
            f"({args.patients / took:,.0f}/s, transaction Bundles of {args.batch}, "
            f"{args.import_clients} at a time, after {len(seeded) - args.patients:,} to warm up)"
        )
        create_body = _compact(make_patient(rng, None, f"MRN-{PLACEHOLDER}", "5550100"))
        smoke_test(server.base_url, seeded, create_body)

        ids_file, bodies_file, create_file = (
            work / "ids.txt",
            work / "bodies.tsv",
            work / "create.json",
        )
        ids_file.write_text("".join(f"{res_id}\n" for res_id, _ in seeded))
        bodies_file.write_text("".join(f"{res_id}\t{body}\n" for res_id, body in seeded))
        create_file.write_text(create_body)
        origin = server.base_url.removesuffix("/fhir")
        wrk_plans = {
            "read": ("read.lua", [str(ids_file), "/fhir/Patient/"]),
            "create": ("create.lua", [str(create_file), "/fhir/Patient"]),
            "update": ("update.lua", [str(bodies_file), "/fhir/Patient/"]),
        }

        def server_watch() -> CpuWatch:
            return CpuWatch(
                {"server": lambda: process_tree(server.pid), "postgres": lambda: backend_pids(dsn)}
            )

        for operation in args.ops:
            script, script_args = wrk_plans[operation]
            for conc in args.concurrency:
                print(f"  {operation:<6} -c{conc:<3} server ...", end="", flush=True)
                measured = run_wrk(
                    origin,
                    script,
                    connections=conc,
                    duration=args.duration,
                    script_args=script_args,
                    cpu_watch=server_watch(),
                )
                print(f" {measured.rate:,.0f}/s", end="", flush=True)
                if args.verbose:
                    print("\n" + measured.raw_output.rstrip())
                raw = None
                if not args.no_baseline:
                    print("  raw SQL ...", end="", flush=True)
                    raw = run_closed_loop(
                        raw_worker(operation, dsn, seeded, create_body),
                        concurrency=conc,
                        duration=args.duration,
                        cpu_watch=CpuWatch({"postgres": lambda: backend_pids(dsn)}),
                    )
                    print(f" {raw.rate:,.0f}/s", end="")
                print()
                rows.append(Row(operation, conc, measured, raw))
    return rows


def _server_share(cpu: CpuShares | None) -> str:
    """Total server CPU and its split over the busy processes, e.g. ``150% (80+70)``."""
    if cpu is None or "server" not in cpu.groups:
        return "-"
    split = "+".join(f"{x * 100:.0f}" for x in cpu.busiest("server"))
    return (
        f"{fmt_share(cpu.groups['server'])} ({split})" if split else fmt_share(cpu.groups["server"])
    )


_MAIN_HEADERS = [
    "operation", "conc", "server req/s", "p50", "p95", "p99", "errors",
    "raw SQL ops/s", "p50", "p95", "p99", "req/s ratio", "p99 ratio",
]  # fmt: skip
_CPU_HEADERS = [
    "operation", "conc", "wrk", "server (per worker)", "postgres", "machine",
    "raw client (python)", "postgres", "machine",
]  # fmt: skip


def report(rows: list[Row], args: argparse.Namespace) -> str:
    """The printed result: figures, CPU use, and the targets."""
    out: list[str] = []
    head = (
        f"CRUD benchmark: {args.patients:,} Patients, {args.workers} server workers, "
        f"{args.duration:g} s per run, wrk -t1 (latencies in ms)"
    )
    out += [head, f"Environment: {getattr(args, 'environment', '?')}", ""]
    table = []
    for r in rows:
        s, b = r.server, r.raw
        errors = f"{s.errors:,}" if s.errors else "0"
        table.append(
            [
                r.operation,
                str(r.concurrency),
                fmt_rate(s.rate),
                fmt_ms(s.p50),
                fmt_ms(s.p95),
                fmt_ms(s.p99),
                errors,
                fmt_rate(b.rate) if b else "-",
                fmt_ms(b.p50) if b else "-",
                fmt_ms(b.p95) if b else "-",
                fmt_ms(b.p99) if b else "-",
                fmt_ratio(s.rate / b.rate) if b and b.rate else "-",
                fmt_ratio(s.p99 / b.p99) if b and b.p99 else "-",
            ]
        )
    out.append(format_table(_MAIN_HEADERS, table, align="lrrrrrrrrrrrr"))
    out += [
        "",
        "ratio = server / raw SQL. Errors = non-2xx/3xx responses + socket errors.",
        "",
        "CPU during the runs, in % of one core "
        f"(machine: {os.cpu_count()} CPUs; 'machine' = all CPUs busy, other users included):",
        "",
    ]
    cpu_rows = []
    for r in rows:
        s, b = r.server, r.raw
        sc, bc = s.cpu, b.cpu if b else None
        cpu_rows.append(
            [
                r.operation,
                str(r.concurrency),
                fmt_share(s.client_cpu),
                _server_share(sc),
                fmt_share(sc.groups.get("postgres") if sc else None),
                f"{sc.machine_busy * 100:.0f}%" if sc else "-",
                fmt_share(b.client_cpu) if b else "-",
                fmt_share(bc.groups.get("postgres") if bc else None),
                f"{bc.machine_busy * 100:.0f}%" if bc else "-",
            ]
        )
    out.append(format_table(_CPU_HEADERS, cpu_rows, align="lrrrrrrrr"))
    top = max(args.concurrency)
    out += ["", f"Targets (at -c{top}; information only):", ""]
    target_rows = []
    for target in TARGETS:
        found = next(
            (r for r in rows if r.operation == target.operation and r.concurrency == top), None
        )
        if found is None:
            continue
        rate = found.server.rate
        target_rows.append(
            [
                f"{target.operation}s/s",
                f">= {target.min_rate:,.0f}",
                fmt_rate(rate),
                "PASS" if rate >= target.min_rate else "below",
            ]
        )
        if target.max_p99 is not None:
            p99 = found.server.p99
            target_rows.append(
                [
                    f"{target.operation} p99 ms",
                    f"< {target.max_p99:g}",
                    fmt_ms(p99),
                    "PASS" if p99 < target.max_p99 else "below",
                ]
            )
    out.append(format_table(["figure", "target", "measured", ""], target_rows, align="lrrl"))
    out += ["", MEDPLUM]
    if any(r.server.errors for r in rows):
        out += ["", "WARNING: some server requests failed; their rates are not comparable."]
    if any(r.raw and r.raw.errors for r in rows):
        failed = sum(r.raw.errors for r in rows if r.raw)
        out += ["", f"WARNING: {failed:,} raw SQL operations failed."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench crud [options]``: run the benchmark and print its tables."""
    return run_benchmark(
        _parse_args(argv), run, report, stopped="server stopped and database cleaned up"
    )


if __name__ == "__main__":
    sys.exit(main())
