"""Imaging: C-STORE via the DICOM gateway, DICOMweb via the bridge, each vs Orthanc on its own.

Store. ``--instances`` CT-like instances (512x512, 16-bit, pydicom; ``--studies`` studies of
``--series`` series each) are written once into a temporary folder. dcmtk's ``storescu`` (one
association per study, ``--parallel`` at a time; the same invocation for both sides) sends them
to the gateway (``python -m dicom_gateway`` as a subprocess, its own spool folder, forwarding to a
fresh Orthanc, no FHIR sync) and, as the baseline, to the DICOM port of a second fresh Orthanc.
The gateway's figures are measured twice: until ``storescu`` returned (what the modality sees:
the gateway answers once an instance is spooled) and until every instance is in its Orthanc
(``/statistics`` CountInstances polled), the end-to-end figure compared with the baseline.

DICOMweb (PS3.18 10.4 WADO-RS). ``mso serve`` on a throw-away PostgreSQL database with
``MSO_ORTHANC_URL`` set to the gateway's Orthanc; a Patient and one ImagingStudy per study
(identifier ``urn:dicom:uid|urn:oid:<StudyInstanceUID>``) make the studies visible to a system
token. Series metadata (``/studies/{s}/series/{x}/metadata``): the first request of a series
(cold, each side on its own series), then ``--requests`` requests each, bridge and direct taking
turns on one series; series retrieve (multipart/related, ``application/dicom``): ``--retrieves``
each, taking turns, bytes/s of the whole body.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import (
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    format_table,
    free_port,
    fresh_database,
    http_json,
    machine_state,
    mint_system_token,
    percentile,
    run_benchmark,
    running_server,
)
from bench.dicom_data import StudyFiles, send_studies, write_studies
from bench.orthanc import Orthanc, missing_imaging_tools, start_orthanc

GATEWAY_AET = "MSO"
ORTHANC_AET = "ORTHANC"
GATEWAY_START_TIMEOUT = 30.0
STORE_TARGET = 0.8  # gateway end to end / direct, instances per second
METADATA_TARGET = 1.5  # bridge p95 / direct p95
RETRIEVE_TARGET = 0.8  # bridge / direct, bytes per second
DICOM_UID_SYSTEM = "urn:dicom:uid"
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"'
METADATA_ACCEPT = "application/dicom+json"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
MB = 1_000_000


# -- the gateway as a subprocess ------------------------------------------------------------


@dataclass
class GatewayProcess:
    """A running ``python -m dicom_gateway``: its DICOM port and output file."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the gateway's output."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _echo(port: int, called_aet: str) -> bool:
    """One C-ECHO with dcmtk's echoscu: whether the SCP on ``port`` answered."""
    done = subprocess.run(
        ["echoscu", "--call", called_aet, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return done.returncode == 0


@contextlib.contextmanager
def running_gateway(spool: Path, orthanc: Orthanc, log_path: Path) -> Iterator[GatewayProcess]:
    """Start the gateway forwarding to ``orthanc`` (no FHIR sync) and yield it once it answers
    a C-ECHO; stopped (SIGTERM, then SIGKILL) when the block ends."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSO_DICOM_")}
    command = [
        sys.executable, "-m", "dicom_gateway",
        "--aet", GATEWAY_AET,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--spool-dir", str(spool),
        "--orthanc-url", orthanc.url,
        "--log-level", "WARNING",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    gateway = GatewayProcess(process, port, log_path)
    try:
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT
        while not _echo(port, GATEWAY_AET):
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited while starting:\n{gateway.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not answer a C-ECHO:\n{gateway.log_tail()}")
            time.sleep(0.2)
        yield gateway
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def wait_for_instances(orthanc: Orthanc, expected: int, timeout: float) -> int:
    """Poll Orthanc's instance count until it reaches ``expected`` or ``timeout`` passes;
    the last count."""
    deadline = time.monotonic() + timeout
    while True:
        count = orthanc.instance_count()
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


# -- store ----------------------------------------------------------------------------------


@dataclass
class StoreFigures:
    """One side of the store measurement (seconds from the first association)."""

    modality_seconds: float
    stored_seconds: float
    stored: int


def store_direct(
    studies: list[StudyFiles], orthanc: Orthanc, args: argparse.Namespace
) -> StoreFigures:
    """Send the studies to Orthanc's own DICOM port (it answers once it has stored)."""
    seconds = send_studies(
        studies,
        port=orthanc.dicom_port,
        called_aet=ORTHANC_AET,
        parallel=args.parallel,
        timeout=args.timeout,
        nodelay=args.tcp_nodelay,
    )
    stored = orthanc.instance_count()
    return StoreFigures(seconds, seconds, stored)


def store_through_gateway(
    studies: list[StudyFiles], gateway: GatewayProcess, orthanc: Orthanc, args: argparse.Namespace
) -> StoreFigures:
    """Send the studies to the gateway, then wait until its Orthanc has every instance."""
    expected = sum(s.instances for s in studies)
    started = time.perf_counter()
    modality = send_studies(
        studies,
        port=gateway.port,
        called_aet=GATEWAY_AET,
        parallel=args.parallel,
        timeout=args.timeout,
        nodelay=args.tcp_nodelay,
    )
    stored = wait_for_instances(orthanc, expected, args.timeout)
    return StoreFigures(modality, time.perf_counter() - started, stored)


# -- DICOMweb -------------------------------------------------------------------------------


@dataclass
class WebSide:
    """DICOMweb figures of one side (bridge or direct); ``error`` when it could not run."""

    cold_ms: float | None = None
    first_image_ms: float | None = None
    first_image_warm_ms: float | None = None
    metadata_ms: list[float] = field(default_factory=list)
    retrieve_rates: list[float] = field(default_factory=list)  # bytes per second
    retrieve_bytes: int = 0
    error: str | None = None

    def p(self, q: float) -> float | None:
        """Percentile ``q`` of the warm metadata latencies (ms)."""
        return percentile(sorted(self.metadata_ms), q) if self.metadata_ms else None

    @property
    def retrieve_rate(self) -> float | None:
        """Median retrieve rate (bytes/s)."""
        return statistics.median(self.retrieve_rates) if self.retrieve_rates else None


@dataclass
class WebFigures:
    """Both sides, and which series were measured."""

    bridge: WebSide
    direct: WebSide
    metadata_series_instances: int = 0
    retrieve_series_instances: int = 0


def _timed_get(client: httpx.Client, url: str, accept: str) -> tuple[float, int]:
    """GET ``url`` reading the whole body: (seconds, body bytes); a non-200 raises."""
    started = time.perf_counter()
    size = 0
    with client.stream("GET", url, headers={"Accept": accept}) as response:
        for chunk in response.iter_raw(1 << 20):
            size += len(chunk)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code} for {url}")
    return time.perf_counter() - started, size


def _first_image(client: httpx.Client, series_url: str) -> float:
    """What a viewer waits before it can draw a series it has not opened yet: the series
    metadata (DICOM JSON), then frame 1 of its first instance; seconds."""
    started = time.perf_counter()
    response = client.get(f"{series_url}/metadata", headers={"Accept": METADATA_ACCEPT})
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code} for the series metadata")
    first = min(
        response.json(), key=lambda i: int((i.get("00200013") or {"Value": [0]})["Value"][0])
    )
    sop_uid = first["00080018"]["Value"][0]
    _timed_get(client, f"{series_url}/instances/{sop_uid}/frames/1", FRAME_ACCEPT)
    return time.perf_counter() - started


def _series_url(root: str, study: StudyFiles, index: int) -> str:
    return f"{root}/studies/{study.uid}/series/{study.series[index].uid}"


def register_studies(base_url: str, studies: list[StudyFiles]) -> None:
    """One Patient and an ImagingStudy per study, so that the bridge lets a token see them."""
    status, patient = http_json("POST", f"{base_url}/Patient", {"resourceType": "Patient"})
    if status != 201:
        raise RuntimeError(f"creating the Patient answered {status}: {patient}")
    for study in studies:
        body = {
            "resourceType": "ImagingStudy",
            "status": "available",
            "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.uid}"}],
            "subject": {"reference": f"Patient/{patient['id']}"},
            "numberOfSeries": len(study.series),
            "numberOfInstances": study.instances,
        }
        status, answer = http_json("POST", f"{base_url}/ImagingStudy", body)
        if status != 201:
            raise RuntimeError(f"creating an ImagingStudy answered {status}: {answer}")


def measure_web(
    sides: dict[str, tuple[httpx.Client, str]], studies: list[StudyFiles], args: argparse.Namespace
) -> dict[str, WebSide]:
    """Cold and warm series metadata, then series retrieves, the sides taking turns. A side
    whose request fails keeps its error and is left out of the rest."""
    out = {name: WebSide() for name in sides}

    def attempt(name: str, action: Callable[[httpx.Client, str], None]) -> None:
        if out[name].error:
            return
        client, root = sides[name]
        try:
            action(client, root)
        except (httpx.HTTPError, RuntimeError) as exc:
            out[name].error = str(exc) or type(exc).__name__

    # cold: each side on a series nobody has asked for yet
    for index, name in enumerate(sides):
        study = studies[index % len(studies)]
        url = _series_url("{root}", study, len(study.series) - 1) + "/metadata"

        def cold(client: httpx.Client, root: str, url: str = url, name: str = name) -> None:
            out[name].cold_ms = _timed_get(client, url.format(root=root), METADATA_ACCEPT)[0] * 1000

        attempt(name, cold)
    # time to first image: each side on another series nobody has asked for yet
    for index, name in enumerate(sides):
        study = studies[index % len(studies)]
        url = _series_url("{root}", study, max(0, len(study.series) - 2))

        def first(client: httpx.Client, root: str, url: str = url, name: str = name) -> None:
            out[name].first_image_ms = _first_image(client, url.format(root=root)) * 1000

        attempt(name, first)
    warm_url = _series_url("{root}", studies[0], 0) + "/metadata"
    for name in sides:  # one untimed request each: both caches (if any) hold the series
        attempt(name, lambda c, r: _timed_get(c, warm_url.format(root=r), METADATA_ACCEPT) and None)
    # time to first image as a viewer finds it after ingest (the gateway asked once already)
    for name in sides:

        def warmed(client: httpx.Client, root: str, name: str = name) -> None:
            series = warm_url.format(root=root).removesuffix("/metadata")
            out[name].first_image_warm_ms = _first_image(client, series) * 1000

        attempt(name, warmed)
    deadline = time.monotonic() + args.phase_seconds
    for _ in range(args.requests):
        for name in sides:

            def warm(client: httpx.Client, root: str, name: str = name) -> None:
                seconds, _ = _timed_get(client, warm_url.format(root=root), METADATA_ACCEPT)
                out[name].metadata_ms.append(seconds * 1000)

            attempt(name, warm)
        if time.monotonic() > deadline:
            break
    retrieve_url = _series_url("{root}", studies[-1], len(studies[-1].series) - 1)
    deadline = time.monotonic() + args.phase_seconds
    for _ in range(args.retrieves):
        for name in sides:

            def retrieve(client: httpx.Client, root: str, name: str = name) -> None:
                seconds, size = _timed_get(client, retrieve_url.format(root=root), RETRIEVE_ACCEPT)
                out[name].retrieve_rates.append(size / seconds)
                out[name].retrieve_bytes = size

            attempt(name, retrieve)
        if time.monotonic() > deadline:
            break
    return out


def run_dicomweb(
    studies: list[StudyFiles], orthanc: Orthanc, args: argparse.Namespace
) -> WebFigures:
    """Start ``mso serve`` on the gateway's Orthanc and measure bridge and direct DICOMweb; when
    the server or its bridge cannot serve, the bridge side carries the reason."""
    direct_client = httpx.Client(timeout=args.timeout)
    figures = WebFigures(
        WebSide(),
        WebSide(),
        metadata_series_instances=studies[0].series[0].instances,
        retrieve_series_instances=studies[-1].series[-1].instances,
    )
    env = {"MSO_ORTHANC_URL": orthanc.url, "MSO_ORTHANC_DICOMWEB_PATH": "/dicom-web"}
    try:
        with (
            fresh_database("mso_bench_dicom") as database_url,
            running_server(database_url, workers=args.workers, extra_env=env) as server,
        ):
            register_studies(server.base_url, studies)
            token = mint_system_token(database_url, server.base_url)
            bridge_root = server.base_url.removesuffix("/fhir") + "/dicomweb"
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(timeout=args.timeout, headers=headers) as bridge_client:
                sides = {
                    "bridge": (bridge_client, bridge_root),
                    "direct": (direct_client, orthanc.dicomweb),
                }
                measured = measure_web(sides, studies, args)
            figures.bridge, figures.direct = measured["bridge"], measured["direct"]
    except RuntimeError as exc:  # the server did not start, or refused the set-up
        figures.bridge.error = str(exc).splitlines()[0]
    if figures.bridge.error and not figures.direct.metadata_ms:
        figures.direct = measure_web({"direct": (direct_client, orthanc.dicomweb)}, studies, args)[
            "direct"
        ]
    direct_client.close()
    return figures


# -- the run --------------------------------------------------------------------------------


@dataclass
class Figures:
    """Everything :func:`report` prints."""

    environment: str
    studies: list[StudyFiles]
    write_seconds: float
    gateway: StoreFigures
    direct: StoreFigures
    web: WebFigures | None

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.studies)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.studies)


def run(args: argparse.Namespace) -> Figures:
    """Write the instances, run both stores, then the DICOMweb comparison."""
    reason = missing_imaging_tools()
    if reason:
        raise RuntimeError(reason)
    environment = machine_state()
    print(f"Environment: {environment}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mso-bench-dicom-") as name:
        root = Path(name)
        started = time.perf_counter()
        studies = write_studies(
            root / "data",
            instances=args.instances,
            studies=args.studies,
            series_per_study=args.series,
            rows=args.size,
            columns=args.size,
        )
        write_seconds = time.perf_counter() - started
        print(f"Wrote {args.instances:,} instances in {write_seconds:.1f} s", file=sys.stderr)
        # --tcp-nodelay: Orthanc's own DICOM port tuned the same way (its toolkit reads the
        # variable), so that the direct side is not held back by delayed acknowledgements
        tuned = {"TCP_NODELAY": "1"} if args.tcp_nodelay else None
        direct_orthanc = start_orthanc(root / "orthanc-direct", aet=ORTHANC_AET, env=tuned)
        gateway_orthanc = start_orthanc(root / "orthanc-gateway", aet=ORTHANC_AET, env=tuned)
        try:
            direct = store_direct(studies, direct_orthanc, args)
            print(f"Direct store: {direct.stored_seconds:.1f} s", file=sys.stderr)
            with running_gateway(root / "spool", gateway_orthanc, root / "gateway.log") as gateway:
                through = store_through_gateway(studies, gateway, gateway_orthanc, args)
            print(f"Gateway store: {through.stored_seconds:.1f} s", file=sys.stderr)
            direct_orthanc.stop()
            web = None if args.no_dicomweb else run_dicomweb(studies, gateway_orthanc, args)
        finally:
            direct_orthanc.stop()
            gateway_orthanc.stop()
    return Figures(environment, studies, write_seconds, through, direct, web)


# -- output ---------------------------------------------------------------------------------


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _target(what: str, relation: str, target: float, ratio: float | None) -> str:
    """One target line: ``what`` ``relation`` ``target`` x direct, the ratio, PASS or below."""
    if ratio is None:
        verdict = "not measured"
    else:
        verdict = "PASS" if (ratio <= target if relation == "<=" else ratio >= target) else "below"
    return f"{what} {relation} {target:g}x direct: {fmt_ratio(ratio)} -> {verdict}"


def _store_rows(fig: Figures) -> list[list[str]]:
    n, mb = fig.instances, fig.nbytes / MB
    g, d = fig.gateway, fig.direct
    rows = []
    for label, gateway_s in (
        ("modality side", g.modality_seconds),
        ("end to end", g.stored_seconds),
    ):
        rows += [
            [
                f"instances/s, {label}",
                fmt_rate(n / gateway_s),
                fmt_rate(n / d.stored_seconds),
                fmt_ratio(d.stored_seconds / gateway_s),
            ],
            [
                f"MB/s, {label}",
                f"{mb / gateway_s:,.1f}",
                f"{mb / d.stored_seconds:,.1f}",
                fmt_ratio(d.stored_seconds / gateway_s),
            ],
            [f"seconds, {label}", f"{gateway_s:,.2f}", f"{d.stored_seconds:,.2f}", "-"],
        ]
    rows.append(["instances in Orthanc", f"{g.stored:,}", f"{d.stored:,}", "-"])
    return rows


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:,.1f}"


def _web_rows(web: WebFigures) -> list[list[str]]:
    b, d = web.bridge, web.direct

    def row(
        label: str,
        value: Callable[[WebSide], float | None],
        fmt: Callable[[float | None], str],
        *,
        compare: bool = True,
    ) -> list[str]:
        vb, vd = value(b), value(d)
        ratio = fmt_ratio(_ratio(vb, vd)) if compare and not b.error else "-"
        return [label, "n/a" if b.error else fmt(vb), fmt(vd), ratio]

    return [
        row("series metadata, first request (ms)", lambda s: s.cold_ms, fmt_ms),
        row("time to first image, new series (ms)", lambda s: s.first_image_ms, fmt_ms),
        row(
            "time to first image, series asked for once (ms)",
            lambda s: s.first_image_warm_ms,
            fmt_ms,
        ),
        row("series metadata p50 (ms)", lambda s: s.p(50), fmt_ms),
        row("series metadata p95 (ms)", lambda s: s.p(95), fmt_ms),
        row("series metadata requests", lambda s: len(s.metadata_ms), fmt_rate, compare=False),
        row("series retrieve MB/s (median)", lambda s: s.retrieve_rate, _mb),
        row("series retrieves", lambda s: len(s.retrieve_rates), fmt_rate, compare=False),
        row(
            "series retrieve body (MB)",
            lambda s: s.retrieve_bytes if s.retrieve_rates else None,
            _mb,
            compare=False,
        ),
    ]


def report(fig: Figures, args: argparse.Namespace) -> str:
    """The printed result: store throughput and DICOMweb, each against its baseline."""
    out = [
        f"DICOM benchmark: {fig.instances:,} instances ({args.studies} studies x {args.series} "
        f"series, CT {args.size}x{args.size} 16-bit, {fig.nbytes / MB:,.1f} MB), storescu one "
        "association per "
        f"study, {args.parallel} at a time"
        f"{', Nagle off (TCP_NODELAY=1)' if args.tcp_nodelay else ', Nagle on (storescu default)'}"
        f"; written in {fig.write_seconds:.1f} s",
        f"Environment: {fig.environment}",
        "",
        "C-STORE: through the gateway (spooled, forwarded to Orthanc over REST) vs straight "
        "into a fresh Orthanc's DICOM port:",
        "",
        format_table(["figure", "gateway", "direct", "ratio"], _store_rows(fig), align="lrrr"),
        "",
        "modality side: until the last storescu returned; end to end: until Orthanc's "
        "CountInstances reached the total (direct: the same instant, Orthanc answers once stored). "
        "ratio = gateway / direct throughput.",
    ]
    store_ratio = fig.direct.stored_seconds / fig.gateway.stored_seconds
    targets = [_target("store end to end", ">=", STORE_TARGET, store_ratio)]
    web = fig.web
    if web is not None:
        out += [
            "",
            f"DICOMweb WADO-RS through the bridge (mso serve, {args.workers} worker(s)) vs "
            f"straight from Orthanc's DICOMweb plugin (metadata: a series of "
            f"{web.metadata_series_instances} instances; retrieve: a series of "
            f"{web.retrieve_series_instances}):",
            "",
            format_table(["figure", "bridge", "direct", "ratio"], _web_rows(web), align="lrrr"),
            "",
            "ratio = bridge / direct (latency: lower is better; MB/s: higher is better).",
        ]
        if web.bridge.error:
            out += ["", f"bridge: not available ({web.bridge.error})"]
        if web.direct.error:
            out += ["", f"direct: failed ({web.direct.error})"]
        if not web.bridge.error:
            p95 = _ratio(web.bridge.p(95), web.direct.p(95))
            rate = _ratio(web.bridge.retrieve_rate, web.direct.retrieve_rate)
            targets += [
                _target("metadata p95", "<=", METADATA_TARGET, p95),
                _target("retrieve MB/s", ">=", RETRIEVE_TARGET, rate),
            ]
    out += ["", "Targets (information only):", *(f"  {t}" for t in targets)]
    if fig.gateway.stored < fig.instances or fig.direct.stored < fig.instances:
        out += ["", "WARNING: not every instance reached Orthanc within --timeout."]
    return "\n".join(out)


# -- options --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m bench dicom``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench dicom",
        description="C-STORE through the DICOM gateway vs straight into Orthanc, and DICOMweb "
        "through the server's bridge vs straight from Orthanc.",
    )
    parser.add_argument("--instances", type=int, default=2000, help="instances to send (2000)")
    parser.add_argument("--studies", type=int, default=4, help="studies (4)")
    parser.add_argument("--series", type=int, default=5, help="series per study (5)")
    parser.add_argument(
        "--size", type=int, default=512, help="rows and columns of each image (512)"
    )
    parser.add_argument("--parallel", type=int, default=4, help="associations at a time (4)")
    parser.add_argument("--requests", type=int, default=50, help="metadata requests per side (50)")
    parser.add_argument("--retrieves", type=int, default=5, help="series retrieves per side (5)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (1)")
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=60.0,
        help="longest time of the metadata phase and of the retrieve phase (60)",
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="longest wait for a store or a request (180)"
    )
    parser.add_argument("--no-dicomweb", action="store_true", help="only the store comparison")
    parser.add_argument(
        "--tcp-nodelay",
        action="store_true",
        help="storescu and Orthanc run with Nagle's algorithm off (TCP_NODELAY=1), both sides",
    )
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.studies <= 100 or not 1 <= args.series <= 100:
        parser.error("--studies and --series must be within 1..100")
    if not args.studies * args.series <= args.instances <= 20000:
        parser.error("--instances must be at least one per series and at most 20000")
    if not 1 <= args.parallel <= 32:
        parser.error("--parallel must be within 1..32")
    if not 1 <= args.requests <= 1000 or not 1 <= args.retrieves <= 100:
        parser.error("--requests must be within 1..1000, --retrieves within 1..100")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be within 1..16")
    if not 8 <= args.size <= 4096:
        parser.error("--size must be within 8..4096")
    return args


def main(argv: list[str] | None = None) -> int:
    """``python -m bench dicom [options]``: run the benchmark and print its tables."""
    return run_benchmark(
        _parse_args(argv), run, report, stopped="gateway, Orthancs and server stopped"
    )


if __name__ == "__main__":
    sys.exit(main())
