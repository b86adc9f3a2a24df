"""Reusable pieces of the benchmarks.

* :func:`fresh_database`: a throw-away PostgreSQL database on the local server (dropped at the end).
* :func:`running_server`: ``mso serve`` as a subprocess on a free loopback port, always stopped.
* :func:`run_wrk`: one ``wrk`` run with a Lua script from ``bench/lua``, its output parsed and its
  own CPU use measured.
* :func:`run_closed_loop`: the same kind of measurement for an in-process operation (e.g. raw SQL),
  one thread per simulated client.
* :class:`CpuWatch`: CPU used by groups of processes (server workers, PostgreSQL backends) and by
  the whole machine over an interval.
* :func:`format_table` and the ``fmt_*`` helpers: aligned plain-text tables.

Everything talks to loopback only and every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

LUA_DIR = Path(__file__).resolve().parent / "lua"
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
WRK = "/usr/bin/wrk"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def psycopg_dsn(url: str) -> str:
    """A libpq URL for psycopg from a SQLAlchemy one (``postgresql+psycopg://`` → ``postgresql://``)."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def install_sigterm_handler() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that clean-up (server stop, DB drop) still runs."""

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


def run_benchmark(
    args: Any, run: Callable[[Any], Any], report: Callable[[Any, Any], str], *, stopped: str
) -> int:
    """A benchmark's ``main`` after parsing its options: SIGTERM handled, ``run(args)``, its
    ``report`` printed; 130 on Ctrl-C (``stopped`` says what was cleaned up), 1 on a
    :class:`RuntimeError` (the benchmark could not run)."""
    install_sigterm_handler()
    try:
        figures = run(args)
    except KeyboardInterrupt:
        print(f"\nInterrupted; {stopped}.", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(report(figures, args))
    return 0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


# -- PostgreSQL -------------------------------------------------------------------------------


def admin_dsn(database: str = "postgres") -> str:
    """libpq URL of ``database`` on the local server as the ``postgres`` user (trust auth)."""
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


@contextlib.contextmanager
def fresh_database(prefix: str = "mso_bench", *, keep: bool = False) -> Iterator[str]:
    """Create an empty database on 127.0.0.1:5432 and yield its SQLAlchemy URL.

    The database is dropped when the block ends (also on errors and Ctrl-C) unless ``keep``.
    """
    import psycopg

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        if keep:
            print(f"Kept database {name}", file=sys.stderr)
        else:
            with psycopg.connect(admin_dsn(), autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backend_pids(dsn: str) -> set[int]:
    """PIDs of the PostgreSQL backends connected to ``dsn``'s database (except this query's)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return {int(r[0]) for r in rows}


# -- the server -------------------------------------------------------------------------------


@dataclass
class Server:
    """A running ``mso serve``: its FHIR base URL, process and log file."""

    base_url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """PID of the server's main process (the workers are its children)."""
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _server_command() -> list[str]:
    """``mso`` next to this interpreter if installed there, else ``python -m fhir_server.cli``."""
    beside = Path(sys.executable).with_name("mso")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mso")
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return [found]
    return [sys.executable, "-m", "fhir_server.cli"]


def _get(url: str, timeout: float) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        resp.read()
        return int(resp.status)


@contextlib.contextmanager
def running_server(
    database_url: str,
    *,
    workers: int = 2,
    startup_timeout: float = 120.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Start ``mso serve --port <free> --workers N`` on ``database_url`` and yield it once
    ``GET /fhir/metadata`` answers 200. The server is stopped when the block ends, always.
    """
    port = free_port()
    fd, name = tempfile.mkstemp(prefix="mso-bench-server-", suffix=".log")
    log_path = Path(name)
    env = dict(os.environ)
    env.update(extra_env or {})
    env["MSO_DATABASE_URL"] = database_url
    cmd = [
        *_server_command(),
        "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", str(workers),
        "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(
        cmd,
        stdout=fd,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # our Ctrl-C does not reach it: we stop it ourselves, in order
    )
    os.close(fd)
    server = Server(f"http://127.0.0.1:{port}/fhir", port, process, log_path)
    try:
        _wait_ready(server, startup_timeout)
        token = mint_system_token(database_url, server.base_url)
        _AUTHORIZATION["Authorization"] = f"Bearer {token}"
        yield server
    finally:
        _AUTHORIZATION.clear()
        stop_server(server)
        with contextlib.suppress(OSError):
            log_path.unlink()


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with status {server.process.returncode} while starting:\n"
                + server.log_tail()
            )
        with contextlib.suppress(OSError, urllib.error.URLError):
            if _get(server.base_url + "/metadata", timeout=5) == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the server did not answer /fhir/metadata within {timeout:.0f} s:\n"
                + server.log_tail()
            )
        time.sleep(0.25)


def stop_server(server: Server, grace: float = 15.0) -> None:
    """SIGTERM the server's process group (its own session), then SIGKILL after ``grace`` s."""
    proc = server.process
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


_WARNED_REDIRECTS: set[tuple[str, str]] = set()


# The bearer token of the server being measured (every FHIR request needs one): a backend
# services token with system scopes, minted by :func:`running_server` once the server is up.
_AUTHORIZATION: dict[str, str] = {}


def wrk_header_args() -> list[str]:
    """wrk's ``-H`` arguments sending the measured server's bearer token."""
    return [arg for name, value in _AUTHORIZATION.items() for arg in ("-H", f"{name}: {value}")]


def mint_system_token(database_url: str, fhir_base: str) -> str:
    """A day-long system-scoped access token for the server at ``fhir_base`` on ``database_url``."""
    from fhir_server.auth.tokens import TokenService
    from fhir_server.config import Settings
    from fhir_server.storage.engine import build_engine

    engine = build_engine(database_url)
    try:
        service = TokenService(engine, Settings(database_url=database_url))
        return service.issue_access_token(
            client_id="bench",
            scopes="system/*.cruds",
            role="system",
            audience=fhir_base,
            lifetime=86400,
        )
    finally:
        engine.dispose()


def http_json(
    method: str, url: str, body: Any = None, *, timeout: float = 300.0, redirects: int = 1
) -> tuple[int, Any]:
    """One JSON request over loopback (``body``: a value to serialize, or serialized bytes);
    returns ``(status, parsed body or None)``.

    A 307/308 redirect to the same host is followed ``redirects`` times with the same method and
    body (a warning names it: FHIR clients do not expect redirects on the base URL).
    """
    # bytes: already serialized (a benchmark's load built before its clock starts)
    data = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/fhir+json")
    for name, value in _AUTHORIZATION.items():
        req.add_header(name, value)
    if data is not None:
        req.add_header("Content-Type", "application/fhir+json")
    location = None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        status, raw, location = exc.code, exc.read(), exc.headers.get("location")
    if status in (307, 308) and location and redirects > 0:
        target = urllib.parse.urljoin(url, location)
        if urllib.parse.urlsplit(target).netloc == urllib.parse.urlsplit(url).netloc:
            if (method, url) not in _WARNED_REDIRECTS:
                _WARNED_REDIRECTS.add((method, url))
                print(f"warning: {method} {url} redirected ({status}) to {target}", file=sys.stderr)
            return http_json(method, target, body, timeout=timeout, redirects=redirects - 1)
    try:
        return status, orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return status, raw.decode(errors="replace")


# -- CPU accounting ---------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (``None`` if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


@dataclass
class CpuShares:
    """CPU used over an interval: per group as a share of one core, the machine as a whole."""

    groups: dict[str, float]
    machine_busy: float
    wall: float
    per_process: dict[str, dict[int, float]] = field(default_factory=dict)

    def busiest(self, group: str, limit: int = 4, floor: float = 0.02) -> list[float]:
        """Shares of the busiest processes of ``group`` (those above ``floor``), largest first."""
        shares = sorted(self.per_process.get(group, {}).values(), reverse=True)
        return [x for x in shares if x >= floor][:limit]


class CpuWatch:
    """Measure the CPU used by groups of processes between :meth:`start` and :meth:`stop`.

    Each group is a function returning its current PIDs; PIDs seen only at the stop (e.g. a
    database connection opened during the run) count from zero.
    """

    def __init__(self, groups: dict[str, Callable[[], Iterable[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self._machine: tuple[int, int] = (0, 0)
        self._t0 = 0.0

    def _sample(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            out[name] = {}
            for pid in pids():
                cpu = process_cpu_seconds(pid)
                if cpu is not None:
                    out[name][pid] = cpu
        return out

    def start(self) -> None:
        """Take the starting sample."""
        self._start = self._sample()
        self._machine = _machine_ticks()
        self._t0 = time.monotonic()

    def stop(self) -> CpuShares:
        """Take the closing sample and return the shares over the interval."""
        wall = max(time.monotonic() - self._t0, 1e-9)
        end = self._sample()
        busy, total = _machine_ticks()
        shares: dict[str, float] = {}
        per_process: dict[str, dict[int, float]] = {}
        for name, pids in end.items():
            before = self._start.get(name, {})
            per_process[name] = {
                pid: max(cpu - before.get(pid, 0.0), 0.0) / wall for pid, cpu in pids.items()
            }
            shares[name] = sum(per_process[name].values())
        d_busy, d_total = busy - self._machine[0], total - self._machine[1]
        return CpuShares(shares, d_busy / d_total if d_total else 0.0, wall, per_process)


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Measurement:
    """Throughput and latency of one load run (latencies in milliseconds)."""

    requests: int
    seconds: float
    p50: float
    p90: float
    p95: float
    p99: float
    errors: int = 0
    client_cpu: float = 0.0  # the load generator's CPU, as a share of one core
    cpu: CpuShares | None = None
    raw_output: str = field(default="", repr=False)

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


_RESULT_LINE = re.compile(r"^BENCH-RESULT (\{.*\})\s*$", re.MULTILINE)
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _to_ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    if not match:
        raise ValueError(f"unrecognised wrk duration {value!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk_output(text: str) -> dict[str, Any]:
    """Figures from wrk's output: ``requests``, ``seconds``, ``rate``, ``p50``/``p75``/``p90``/
    ``p99`` (ms, from ``--latency``), ``non_2xx``, ``socket_errors``; and, when the Lua
    ``done()`` hook of ``bench/lua/report.lua`` ran, ``p95`` and exact figures from its line.
    """
    out: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    match = re.search(r"(\d+) requests in ([\d.]+\w+),", text)
    if match:
        out["requests"] = int(match.group(1))
        out["seconds"] = _to_ms(match.group(2)) / 1000.0
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if match:
        out["rate"] = float(match.group(1))
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)\s*$", text, re.MULTILINE):
        out[f"p{pct}"] = _to_ms(value)
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if match:
        out["non_2xx"] = int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match:
        out["socket_errors"] = sum(int(g) for g in match.groups())
    match = _RESULT_LINE.search(text)
    if match:
        data = json.loads(match.group(1))
        out["lua"] = data
        out["requests"] = int(data["requests"])
        out["seconds"] = data["duration_us"] / 1e6
        for pct in (50, 90, 95, 99):
            out[f"p{pct}"] = data[f"p{pct}_us"] / 1000.0
    return out


def run_wrk(
    url: str,
    script: str | Path,
    *,
    connections: int,
    duration: float,
    threads: int = 1,
    script_args: Sequence[str] = (),
    request_timeout: str = "5s",
    cpu_watch: CpuWatch | None = None,
) -> Measurement:
    """Run ``wrk -t<threads> -c<connections> -d<duration>s --latency -s <script> <url> -- args``.

    ``script`` is a path or a file name in ``bench/lua``. wrk's own CPU share comes from the
    rusage of the child (user + system over wall time). Errors are socket errors plus non-2xx/3xx
    responses. The run is killed if it overruns ``duration`` by 60 s.
    """
    script_path = Path(script) if Path(script).is_absolute() else LUA_DIR / script
    seconds = max(1, round(duration))
    cmd = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={request_timeout}",
        "--latency",
        "-s", str(script_path),
        url,
    ]  # fmt: skip
    cmd[1:1] = wrk_header_args()
    if script_args:
        cmd += ["--", *script_args]
    if cpu_watch:
        cpu_watch.start()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} not found: install it (apt-get install wrk)") from None
    watchdog = threading.Timer(seconds + 60, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        output = proc.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        watchdog.cancel()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - started
    cpu = cpu_watch.stop() if cpu_watch else None
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with status {proc.returncode}:\n{output}")
    parsed = parse_wrk_output(output)
    if "requests" not in parsed or "p99" not in parsed:
        raise RuntimeError(f"could not parse wrk's output:\n{output}")
    return Measurement(
        requests=parsed["requests"],
        seconds=parsed["seconds"],
        p50=parsed["p50"],
        p90=parsed["p90"],
        p95=parsed.get("p95", float("nan")),
        p99=parsed["p99"],
        errors=parsed["non_2xx"] + parsed["socket_errors"],
        client_cpu=(usage.ru_utime + usage.ru_stime) / wall,
        cpu=cpu,
        raw_output=output,
    )


def run_closed_loop(
    make_worker: Callable[[int], tuple[Callable[[], None], Callable[[], None]]],
    *,
    concurrency: int,
    duration: float,
    cpu_watch: CpuWatch | None = None,
) -> Measurement:
    """Drive an in-process operation like wrk drives HTTP: ``concurrency`` threads, each calling
    its operation back to back for ``duration`` seconds.

    ``make_worker(i)`` (called in thread ``i``) returns ``(operation, close)``. An operation
    that raises counts as an error. The client's CPU share is this process's rusage delta.
    """
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    failures: list[BaseException] = []
    ready = threading.Barrier(concurrency + 1, timeout=60)
    go = threading.Event()
    measured = threading.Event()  # connections stay open until the closing CPU sample
    finished = threading.Semaphore(0)
    window = {"end": 0.0}

    def body(index: int) -> None:
        try:
            operation, close = make_worker(index)
        except BaseException as exc:  # report setup failures to the caller
            failures.append(exc)
            ready.abort()
            return
        try:
            ready.wait()
            go.wait(timeout=60)
            deadline = window["end"]
            own = latencies[index]
            clock = time.perf_counter
            while True:
                t0 = clock()
                if t0 >= deadline:
                    break
                try:
                    operation()
                except Exception:
                    errors[index] += 1
                    continue
                own.append(clock() - t0)
            finished.release()
            measured.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        finally:
            close()

    workers = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(concurrency)]
    for worker in workers:
        worker.start()
    try:
        ready.wait()  # every worker has its connection
    except threading.BrokenBarrierError:
        for worker in workers:
            worker.join(timeout=30)
        cause = failures[0] if failures else None
        raise RuntimeError(f"worker setup failed: {cause!r}") from cause
    if cpu_watch:
        cpu_watch.start()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    window["end"] = started + duration
    go.set()
    give_up = started + duration + 60
    for _ in workers:
        finished.acquire(timeout=max(0.0, give_up - time.perf_counter()))
    elapsed = time.perf_counter() - started
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu_watch.stop() if cpu_watch else None
    measured.set()
    for worker in workers:
        worker.join(timeout=30)
    merged = sorted(x * 1000.0 for own in latencies for x in own)
    client = (usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime) / elapsed
    return Measurement(
        requests=len(merged),
        seconds=elapsed,
        p50=percentile(merged, 50),
        p90=percentile(merged, 90),
        p95=percentile(merged, 95),
        p99=percentile(merged, 99),
        errors=sum(errors),
        client_cpu=client,
        cpu=cpu,
    )


# -- output -----------------------------------------------------------------------------------


def fmt_rate(value: float | None) -> str:
    """Requests per second with thousands separators (``-`` when unknown)."""
    return "-" if value is None else f"{value:,.0f}"


def fmt_ms(value: float | None) -> str:
    """Milliseconds with two (below 10) or one decimal."""
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    """A ratio like ``0.42x``."""
    return "-" if value is None or value != value else f"{value:.2f}x"


def fmt_share(value: float | None) -> str:
    """A CPU share as a percentage of one core (``137%`` = 1.37 cores)."""
    return "-" if value is None else f"{value * 100:.0f}%"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, align: str | None = None
) -> str:
    """An aligned plain-text table. ``align`` has one letter per column, ``l`` or ``r``
    (default: first column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(w) if a == "l" else cell.rjust(w)
            for cell, w, a in zip(cells, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def machine_state() -> str:
    """This machine as a benchmark's figures should be read: CPUs, load average, and how busy
    the CPUs were over one second before the start (with a warning when other work runs)."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    watch = CpuWatch({})
    watch.start()
    time.sleep(1.0)
    busy = watch.stop().machine_busy
    note = "  (other work is running: figures will be low)" if busy > 0.25 else ""
    return (
        f"{os.cpu_count()} CPUs; load average {load}; CPU busy before start {busy * 100:.0f}%{note}"
    )
