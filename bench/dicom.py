"""DICOM and media round trip on the 300-slice CT (issue 5, "Performance"): C-STORE into Relay's
gateway and into Orthanc, push from Relay into Orthanc, ZIP export and CD image.

Everything here shares one `Workbench`: one Relay (gunicorn, as for the ingest benchmark, plus
`manage.py dicom_gateway` as its own process on the same database and storage), the study that
came in through the gateway, and an Orthanc holding the same files (the viewer comparison of
viewer.py uses it too). Each section returns a `Section`; run.py prints them and keeps going when
one fails.

The DICOM client on both sides is dcmtk's `storescu`, with TCP_NODELAY=1 in its environment
(dcmtk reads it; Nagle's algorithm off). Orthanc's DICOM server is dcmtk too and gets the same
variable. Relay's gateway and push use pynetdicom, on whose sockets Relay itself turns TCP_NODELAY
on (transfers/dicom_net.py): Relay is measured as it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from measure import MiB, Row, RssSampler, Section, UploadFailed, upload_series
from series import Series
from servers import (
    BENCH_AE_TITLE,
    BENCH_EMAIL,
    PYTHON,
    REPO,
    START_TIMEOUT_S,
    Database,
    GatewayServer,
    OrthancServer,
    RelayServer,
    ServerError,
    echo,
    log_tail,
)

NODELAY = {"TCP_NODELAY": "1"}
ORTHANC_AE = "ORTHANC"  # Orthanc's default AE title; it accepts any called title by default
CALLING_AE = "BENCHSCU"
STORE_TIMEOUT_S = 600
READ_CHUNK = 1024 * 1024
ZIP_REPEATS = 3


@dataclass
class Transfer:
    """One series sent with C-STORE (or pushed) into one receiver."""

    files: int
    bytes: int
    wall_s: float
    idle_rss: int = 0  # receiver, before
    peak_rss: int = 0  # receiver, whole transfer
    first_half_peak_rss: int = 0  # receiver, first half of the wall time
    cpu_s: float = 0.0  # receiver

    @property
    def mib_s(self) -> float:
        return self.bytes / MiB / self.wall_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "wall_s": round(self.wall_s, 3),
            "mib_s": round(self.mib_s, 2),
            "idle_rss_mib": round(self.idle_rss / MiB, 1),
            "peak_rss_mib": round(self.peak_rss / MiB, 1),
            "first_half_peak_rss_mib": round(self.first_half_peak_rss / MiB, 1),
            "cpu_s": round(self.cpu_s, 2),
        }


def storescu(
    files: list[Path],
    *,
    called_ae: str,
    port: int,
    receiver_pid: int,
    parallel: int = 1,
    options: tuple[str, ...] = (),
) -> Transfer:
    """dcmtk's storescu, one association for all files (or `parallel` storescu at once, each
    with its share of the files), TCP_NODELAY=1; the receiver's memory and CPU are sampled
    while it runs."""
    args = ["storescu", *options, "-aet", CALLING_AE, "-aec", called_ae, "127.0.0.1", str(port)]
    total = sum(path.stat().st_size for path in files)
    shares = [files[i::parallel] for i in range(parallel)]
    with ExitStack() as logs, RssSampler(receiver_pid) as sampler:
        outputs = [logs.enter_context(tempfile.TemporaryFile()) for _ in shares]
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                [*args, *map(str, share)],
                env={**os.environ, **NODELAY},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for share, log in zip(shares, outputs, strict=True)
        ]
        try:
            codes = [proc.wait(timeout=STORE_TIMEOUT_S) for proc in procs]
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
                proc.wait()
            raise
        wall = time.perf_counter() - started
        output = ""
        for log in outputs:
            log.seek(0)
            output += log.read().decode(errors="replace")
    if any(codes) or "E: " in output:
        raise UploadFailed(f"storescu to {called_ae} exited {codes}:\n{output[-1500:]}")
    return Transfer(
        files=len(files),
        bytes=total,
        wall_s=wall,
        idle_rss=sampler.idle_bytes,
        peak_rss=sampler.peak_bytes,
        first_half_peak_rss=sampler.peak_between(started, started + wall / 2),
        cpu_s=sampler.cpu_end - sampler.cpu_start,
    )


def orthanc_count(orthanc: OrthancServer) -> int:
    stats = httpx.get(f"{orthanc.base_url}/statistics", timeout=30).json()
    return int(stats["CountInstances"])


def orthanc_filled(files: list[Path]) -> tuple[OrthancServer, Transfer]:
    """A fresh Orthanc (TCP_NODELAY=1) that received the files from storescu; not yet entered
    into an ExitStack: the caller stops it."""
    orthanc = OrthancServer(extra_env=NODELAY)
    orthanc.__enter__()
    try:
        transfer = storescu(
            files, called_ae=ORTHANC_AE, port=orthanc.dicom_port, receiver_pid=orthanc.pid
        )
        if orthanc_count(orthanc) != len(files):
            raise UploadFailed(f"Orthanc indexed {orthanc_count(orthanc)} of {len(files)} files")
    except BaseException as exc:
        orthanc.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return orthanc, transfer


# --- the shared state of one run ----------------------------------------------------------------


@dataclass
class Workbench:
    """One Relay with its gateway and the study it received, shared by all DICOM sections."""

    series: Series
    database: Database
    stack: ExitStack
    relay: RelayServer | None = None
    gateway: GatewayServer | None = None
    study: dict[str, Any] | None = None  # inrelay.py study_info
    ingest: Transfer | None = None
    ingest_how: str = ""
    problems: list[str] = field(default_factory=list)
    reference: OrthancServer | None = None  # an Orthanc holding the series
    reference_transfer: Transfer | None = None
    _reference_error: str = ""

    @property
    def study_instance_uid(self) -> str:
        manifest = json.loads((self.series.folder / "manifest.json").read_text())
        return str(manifest["study_instance_uid"])

    def start(self) -> None:
        """Start Relay and its gateway, and send the series into the gateway (timed: this is
        Relay's side of the gateway section). Without a gateway, the HTTP API is used instead."""
        self.relay = self.stack.enter_context(RelayServer(self.database))
        try:
            self.gateway = self.stack.enter_context(GatewayServer(self.relay))
            self.ingest = storescu(
                self.series.files,
                called_ae=BENCH_AE_TITLE,
                port=self.gateway.port,
                receiver_pid=self.gateway.pid,
            )
            self.ingest_how = "storescu -> Relay gateway"
        except Exception as exc:
            self.problems.append(f"C-STORE into the gateway failed: {exc}")
            self._ingest_http()
        self.study = self.relay.task(
            "study_info", facility=self.relay.facility, study_instance_uid=self.study_instance_uid
        )
        if len(self.study["instances"]) != len(self.series.files):
            raise UploadFailed(
                f"Relay indexed {len(self.study['instances'])} of {len(self.series.files)} files"
            )

    def _ingest_http(self) -> None:
        assert self.relay is not None

        def check(path: Path, response: httpx.Response) -> None:
            if response.status_code != 201:
                raise UploadFailed(f"{path.name}: HTTP {response.status_code}")

        run = upload_series(
            server="Relay",
            url=self.relay.upload_url,
            headers=self.relay.auth_headers,
            files=self.series.files,
            check=check,
            server_pid=self.relay.pid,
        )
        self.ingest = Transfer(files=run.files, bytes=run.total_bytes, wall_s=run.wall_s)
        self.ingest_how = "HTTP upload API, 4 threads (the gateway failed)"

    def need(self) -> tuple[RelayServer, dict[str, Any]]:
        if self.relay is None or self.study is None:
            raise ServerError("no study in Relay: the ingest failed (see above)")
        return self.relay, self.study

    def reference_orthanc(self) -> tuple[OrthancServer, Transfer]:
        """The Orthanc that received the series from storescu (started on first use)."""
        if self._reference_error:
            raise ServerError(self._reference_error)
        if self.reference is None:
            try:
                orthanc, transfer = orthanc_filled(self.series.files)
            except Exception as exc:
                self._reference_error = f"storescu into Orthanc failed: {exc}"
                raise
            self.stack.callback(orthanc.stop)
            self.reference, self.reference_transfer = orthanc, transfer
        assert self.reference_transfer is not None
        return self.reference, self.reference_transfer

    def stored_files(self) -> list[Path]:
        _, study = self.need()
        root = Path(study["media_root"])
        return [root / item["storage_key"] for item in study["instances"]]


# --- 1. C-STORE in ------------------------------------------------------------------------------

# dcmtk's largest receive PDU: `storescu -pdu` (what a sender may receive), and Orthanc's
# largest MaximumPduLength (what it lets senders send).
DCMTK_MAX_PDU = 131072
GATEWAY_PROCESSES = 2
PARALLEL = 4


class GatewayProcesses(GatewayServer):
    """`manage.py dicom_gateway --processes N` in the same Relay's environment."""

    def __init__(self, relay: RelayServer, processes: int) -> None:
        super().__init__(relay)
        self.processes = processes
        self.log = relay.tmp / f"gateway-{processes}.log"

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(PYTHON), "manage.py", "dicom_gateway", "--host", "127.0.0.1",
                    "--port", str(self.port), "--processes", str(self.processes),
                ],
                cwd=REPO,
                env=self.relay._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"the gateway exited:\n{log_tail(self.log)}")
            if echo(BENCH_AE_TITLE, self.port).returncode == 0:
                return
            time.sleep(0.3)
        raise ServerError(f"the gateway did not answer C-ECHO:\n{log_tail(self.log)}")


def _facility_add(relay: RelayServer, ae_title: str) -> str:
    """Another facility of the benchmark with its own AE title (instances are deduplicated per
    facility, so the same series is a fresh ingest there); its slug."""
    slug = ae_title.lower()
    script = (
        "import django; django.setup()\n"
        "from portal.models import Facility\n"
        f"Facility.objects.create(name={ae_title!r}, slug={slug!r}, ae_title={ae_title!r}, "
        "gateway_calling_aes='BENCHSCU ORTHANC', gateway_addresses='127.0.0.1 ::1')\n"
    )
    subprocess.run(
        [str(PYTHON), "-c", script], cwd=REPO, env=relay._env(), check=True, capture_output=True
    )
    return slug


def _relay_count(wb: Workbench, facility: str) -> int:
    assert wb.relay is not None
    info = wb.relay.task("study_info", facility=facility, study_instance_uid=wb.study_instance_uid)
    return len(info["instances"])


def _more_rows(wb: Workbench) -> tuple[list[Row], dict[str, Any]]:
    """4 parallel associations into the gateway with 2 processes vs into Orthanc; one
    association with the largest PDU each receiver allows."""
    assert wb.relay is not None and wb.gateway is not None
    files = wb.series.files
    n = len(files)
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    slug = _facility_add(wb.relay, "BENCHP4")
    with GatewayProcesses(wb.relay, GATEWAY_PROCESSES) as gateway:
        # The facility's own AE title: a fresh facility, so a fresh ingest.
        relay4 = storescu(
            files, called_ae="BENCHP4", port=gateway.port, receiver_pid=gateway.pid,
            parallel=PARALLEL,
        )  # fmt: skip
    if _relay_count(wb, slug) != n:
        raise UploadFailed(f"Relay indexed {_relay_count(wb, slug)} of {n} (4 associations)")
    with OrthancServer(extra_env=NODELAY) as orthanc:
        peer4 = storescu(
            files, called_ae=ORTHANC_AE, port=orthanc.dicom_port, receiver_pid=orthanc.pid,
            parallel=PARALLEL,
        )  # fmt: skip
        if orthanc_count(orthanc) != n:
            raise UploadFailed(f"Orthanc indexed {orthanc_count(orthanc)} of {n} files")
    rows += [
        Row(f"{PARALLEL} associations at once: wall time (s)", relay4.wall_s, peer4.wall_s,
            aim="<= 1.00x"),
        Row(f"{PARALLEL} associations: receiver CPU time (s)", relay4.cpu_s, peer4.cpu_s, "{:.1f}"),
        Row(f"{PARALLEL} associations: receiver peak RSS (MiB)", relay4.peak_rss / MiB,
            peer4.peak_rss / MiB, "{:.0f}"),
    ]  # fmt: skip
    raw["parallel"] = {"relay": relay4.as_dict(), "orthanc": peer4.as_dict()}
    slug = _facility_add(wb.relay, "BENCHPDU")
    pdu = ("-pdu", str(DCMTK_MAX_PDU))
    relay_pdu = storescu(
        files, called_ae="BENCHPDU", port=wb.gateway.port, receiver_pid=wb.gateway.pid,
        options=pdu,
    )  # fmt: skip
    if _relay_count(wb, slug) != n:
        raise UploadFailed(f"Relay indexed {_relay_count(wb, slug)} of {n} (-pdu)")
    with OrthancServer(extra_config={"MaximumPduLength": DCMTK_MAX_PDU}, extra_env=NODELAY) as o:
        peer_pdu = storescu(
            files, called_ae=ORTHANC_AE, port=o.dicom_port, receiver_pid=o.pid, options=pdu
        )
        if orthanc_count(o) != n:
            raise UploadFailed(f"Orthanc indexed {orthanc_count(o)} of {n} files (-pdu)")
    rows += [
        Row("largest PDU, one association: wall time (s)", relay_pdu.wall_s, peer_pdu.wall_s,
            aim="<= 1.00x"),
        Row("largest PDU: receiver CPU time (s)", relay_pdu.cpu_s, peer_pdu.cpu_s, "{:.1f}"),
    ]  # fmt: skip
    raw["largest_pdu"] = {"relay": relay_pdu.as_dict(), "orthanc": peer_pdu.as_dict()}
    relay_o, peer_o = _orthanc_sends(wb)
    rows += [
        Row("Orthanc as the sender: wall time (s)", relay_o.wall_s, peer_o.wall_s,
            aim="<= 1.00x"),
        Row("Orthanc as the sender: receiver CPU time (s)", relay_o.cpu_s, peer_o.cpu_s, "{:.1f}"),
    ]  # fmt: skip
    raw["orthanc_sender"] = {"relay": relay_o.as_dict(), "orthanc": peer_o.as_dict()}
    return rows, raw


def _orthanc_send(
    source: OrthancServer, *, ae_title: str, port: int, receiver_pid: int, total: int
) -> Transfer:
    """The source Orthanc's study sent by C-STORE (its REST `/modalities/{id}/store`, one
    association, synchronous) to a receiver; the receiver's memory and CPU sampled meanwhile."""
    api = source.base_url
    httpx.put(
        f"{api}/modalities/target",
        json={"AET": ae_title, "Host": "127.0.0.1", "Port": port},
        timeout=30,
    ).raise_for_status()
    [study] = httpx.get(f"{api}/studies", timeout=30).json()
    with RssSampler(receiver_pid) as sampler:
        started = time.perf_counter()
        answer = httpx.post(
            f"{api}/modalities/target/store",
            json={"Resources": [study], "Synchronous": True},
            timeout=STORE_TIMEOUT_S,
        )
        wall = time.perf_counter() - started
    if answer.status_code != 200:
        raise UploadFailed(
            f"Orthanc's C-STORE to {ae_title}: HTTP {answer.status_code} {answer.text[:500]}"
        )
    return Transfer(
        files=int(answer.json().get("InstancesCount", 0)),
        bytes=total,
        wall_s=wall,
        idle_rss=sampler.idle_bytes,
        peak_rss=sampler.peak_bytes,
        cpu_s=sampler.cpu_end - sampler.cpu_start,
    )


def _orthanc_sends(wb: Workbench) -> tuple[Transfer, Transfer]:
    """The reference Orthanc (which holds the series) as a PACS sending it: into the gateway
    (one process, a fresh facility) and into a fresh Orthanc."""
    n = len(wb.series.files)
    source, _ = wb.reference_orthanc()
    assert wb.gateway is not None
    slug = _facility_add(wb.relay, "BENCHORT")
    relay = _orthanc_send(
        source,
        ae_title="BENCHORT",
        port=wb.gateway.port,
        receiver_pid=wb.gateway.pid,
        total=wb.series.total_bytes,
    )
    if _relay_count(wb, slug) != n:
        raise UploadFailed(f"Relay indexed {_relay_count(wb, slug)} of {n} (from Orthanc)")
    with OrthancServer(extra_env=NODELAY) as target:
        peer = _orthanc_send(
            source,
            ae_title=ORTHANC_AE,
            port=target.dicom_port,
            receiver_pid=target.pid,
            total=wb.series.total_bytes,
        )
        if orthanc_count(target) != n:
            raise UploadFailed(f"Orthanc indexed {orthanc_count(target)} of {n} (from Orthanc)")
    return relay, peer


def gateway_section(wb: Workbench) -> Section:
    n, mib = len(wb.series.files), wb.series.total_bytes / MiB
    section = Section(
        key="gateway",
        title=f"1. C-STORE {n} files ({mib:.0f} MiB), storescu, one association",
        relay_label="Relay gateway",
        peer_label="Orthanc",
    )
    if wb.gateway is None or wb.ingest is None or not wb.ingest_how.startswith("storescu"):
        section.error = "; ".join(wb.problems) or "the gateway did not run"
        return section
    _, peer = wb.reference_orthanc()
    relay = wb.ingest
    section.rows = [
        Row("wall time (s)", relay.wall_s, peer.wall_s, aim="<= 1.00x"),
        Row("throughput (MiB/s)", relay.mib_s, peer.mib_s, "{:.1f}", ">= 1.00x"),
        Row("files per second", n / relay.wall_s, n / peer.wall_s, "{:.1f}"),
        Row("receiver CPU time (s)", relay.cpu_s, peer.cpu_s, "{:.1f}"),
        Row("receiver idle RSS (MiB)", relay.idle_rss / MiB, peer.idle_rss / MiB, "{:.0f}"),
        Row(
            "receiver peak RSS, first half (MiB)",
            relay.first_half_peak_rss / MiB,
            peer.first_half_peak_rss / MiB,
            "{:.0f}",
        ),
        Row("receiver peak RSS (MiB)", relay.peak_rss / MiB, peer.peak_rss / MiB, "{:.0f}"),
    ]
    section.notes.append(
        "receiver = `manage.py dicom_gateway` (one process) / Orthanc; storescu with "
        "TCP_NODELAY=1 on both; Orthanc with TCP_NODELAY=1 too (dcmtk inside), the gateway "
        "sets it on the sockets it accepts. Flat memory: peak of the first half close to the whole."
    )
    section.raw = {"relay": relay.as_dict(), "orthanc": peer.as_dict()}
    try:
        more, raw = _more_rows(wb)
    except Exception as exc:
        section.notes.append(f"parallel / largest-PDU rows failed: {type(exc).__name__}: {exc}")
    else:
        section.rows += more
        section.raw |= raw
        section.notes.append(
            f"{PARALLEL} associations: the series split in {PARALLEL}, {PARALLEL} storescu at "
            f"once, into `dicom_gateway --processes {GATEWAY_PROCESSES}` (a fresh facility) / a "
            "fresh Orthanc. Largest PDU: `storescu -pdu 131072` into the gateway (which offers "
            "DICOM_GATEWAY_MAX_PDU, 1 MiB; a fresh facility) / a fresh Orthanc with "
            "MaximumPduLength 131072 (its largest; its default is 16384). Orthanc as the "
            "sender: the reference Orthanc's study sent with its REST /modalities/{id}/store "
            "(one association) into the gateway (a fresh facility) / a fresh Orthanc."
        )
    return section


# --- 2. push out --------------------------------------------------------------------------------


def push_section(wb: Workbench) -> Section:
    relay, study = wb.need()
    n = len(study["instances"])
    total = sum(item["size"] for item in study["instances"])
    section = Section(
        key="push",
        title=f"2. push {n} files ({total / MiB:.0f} MiB) into a fresh Orthanc",
        relay_label="Relay push_send",
        peer_label="storescu",
    )
    # A fresh Orthanc each: one that already holds the instances answers faster.
    pushed, receiver_cpu = _push_once(relay, study)
    orthanc, peer = orthanc_filled(wb.series.files)
    orthanc.stop()
    push_mib_s = total / MiB / pushed["wall_s"]
    section.rows = [
        Row("wall time (s)", pushed["wall_s"], peer.wall_s, aim="<= 1.00x"),
        Row("throughput (MiB/s)", push_mib_s, peer.mib_s, "{:.1f}", ">= 1.00x"),
        Row("Orthanc CPU time (s)", receiver_cpu, peer.cpu_s, "{:.1f}"),
        Row(
            "sender RSS after django.setup() (MiB)", pushed["rss_after_setup"] / MiB, None, "{:.0f}"
        ),
        Row("sender peak RSS (MiB)", pushed["rss_peak"] / MiB, None, "{:.0f}"),
    ]
    section.notes.append(
        "Relay: transfers.dicom.push.push_send of the study received by the gateway, in its own "
        "process (the body of the push task; not via Celery), timed around push_send only. "
        "storescu sends the original files; each into a freshly started Orthanc."
    )
    section.raw = {"relay": pushed, "storescu": peer.as_dict()}
    return section


def _push_once(relay: RelayServer, study: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """push_send of the study into a fresh Orthanc: (the task's result, Orthanc's CPU seconds)."""
    n = len(study["instances"])
    with OrthancServer(extra_env=NODELAY) as orthanc:
        proc = relay.task_start(
            "push",
            study_uuid=study["uuid"],
            port=orthanc.dicom_port,
            ae_title=ORTHANC_AE,
            email=BENCH_EMAIL,
        )
        with RssSampler(orthanc.pid) as receiver:
            pushed = relay.task_result(proc, "push")
        if pushed["transient"] or pushed["failed"]:
            raise UploadFailed(f"push {pushed['status']}: {pushed['transient']} {pushed['errors']}")
        if orthanc_count(orthanc) != n:
            raise UploadFailed(f"Orthanc received {orthanc_count(orthanc)} of {n} pushed files")
    return pushed, receiver.cpu_end - receiver.cpu_start


# --- 3. ZIP export ------------------------------------------------------------------------------


def disk_read(files: list[Path]) -> tuple[float, int]:
    """Read the files start to end in 1 MiB chunks, like cat > /dev/null: (seconds, bytes)."""
    total = 0
    started = time.perf_counter()
    for path in files:
        with path.open("rb", buffering=0) as fh:
            while chunk := fh.read(READ_CHUNK):
                total += len(chunk)
    return time.perf_counter() - started, total


def disk_copy(files: list[Path], folder: str | None = None) -> tuple[float, int]:
    """The same files written one after the other into one temporary file (cat > file)."""
    total = 0
    with tempfile.TemporaryFile(dir=folder) as out:
        started = time.perf_counter()
        for path in files:
            with path.open("rb", buffering=0) as fh:
                while chunk := fh.read(READ_CHUNK):
                    out.write(chunk)
                    total += len(chunk)
        out.flush()
        return time.perf_counter() - started, total


def zip_download(client: httpx.Client, url: str) -> dict[str, float]:
    started = time.perf_counter()
    first = 0.0
    size = 0
    with client.stream("GET", url) as response:
        if response.status_code != 200:
            response.read()
            raise UploadFailed(f"GET {url}: HTTP {response.status_code}: {response.text[:300]}")
        expected = int(response.headers.get("Content-Length", "-1"))
        for chunk in response.iter_raw(READ_CHUNK):
            if not first:
                first = time.perf_counter() - started
            size += len(chunk)
    wall = time.perf_counter() - started
    if expected >= 0 and size != expected:
        raise UploadFailed(f"the ZIP had {size} bytes, Content-Length said {expected}")
    return {"wall_s": wall, "first_byte_s": first, "bytes": size}


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache (written back first), so that the next read comes
    from the disk: posix_fadvise(DONTNEED) on these files only, no root needed, nothing else
    on the machine is touched."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def zip_section(wb: Workbench) -> Section:
    relay, study = wb.need()
    files = wb.stored_files()
    image_bytes = sum(path.stat().st_size for path in files)
    section = Section(
        key="zip",
        title=f"3. ZIP export of the study ({image_bytes / MiB:.0f} MiB of images)",
        relay_label="Relay ZIP (HTTP)",
        peer_label="read files",
    )
    url = f"/studies/{study['uuid']}/download/"
    runs: dict[str, list[Any]] = {
        "zip_warm": [], "read_warm": [], "zip_cold": [], "read_cold": [],
        "bare_warm": [], "bare_cold": [],
    }  # fmt: skip
    # 'Evicted' evicts what a download reads besides the images too (the disc viewer's frames
    # kept next to the renders, the renders), so that nothing of it comes from memory either.
    renders = Path(study["media_root"]) / "renders"
    with relay.signed_in() as client, RssSampler(relay.pid) as server:
        # The first download makes the disc viewer's frame files and keeps them (a cache, as
        # after any first download): not one of the timed ones.
        first_download = zip_download(client, url)
        extra = [
            path
            for item in study["instances"]
            for path in (renders / item["storage_key"].removeprefix("dicom/").removesuffix(".dcm")).glob("*")
        ]  # fmt: skip
        # Interleaved so that other load on the machine hits both alike. Warm: the files are in
        # the page cache (just written and read), so the bar is memory speed; cold: evicted
        # before each read, so the bar is the disk's.
        for _ in range(ZIP_REPEATS):
            runs["read_warm"].append(disk_read(files)[0])
            runs["zip_warm"].append(zip_download(client, url))
            runs["bare_warm"].append(zip_download(client, url + "?viewer=0"))
            evict(files)
            runs["read_cold"].append(disk_read(files)[0])
            evict(files + extra)
            runs["zip_cold"].append(zip_download(client, url))
            evict(files + extra)
            runs["bare_cold"].append(zip_download(client, url + "?viewer=0"))
    zip_bytes = runs["zip_warm"][0]["bytes"]
    bare_bytes = runs["bare_warm"][0]["bytes"]

    def median(key: str, field: str = "wall_s") -> float:
        return statistics.median(r[field] if isinstance(r, dict) else r for r in runs[key])

    def mib_s(nbytes: int, seconds: float) -> float:
        return nbytes / MiB / seconds

    first_byte = median("zip_warm", "first_byte_s")
    streamed = statistics.median(
        (d["bytes"] / MiB) / (d["wall_s"] - d["first_byte_s"]) for d in runs["zip_warm"]
    )
    section.rows = [
        Row(
            "throughput, page cache warm (MiB/s)",
            mib_s(zip_bytes, median("zip_warm")),
            mib_s(image_bytes, median("read_warm")),
            "{:.0f}",
            ">= 0.50x",
        ),
        Row(
            "throughput, files evicted first (MiB/s)",
            mib_s(zip_bytes, median("zip_cold")),
            mib_s(image_bytes, median("read_cold")),
            "{:.0f}",
            ">= 0.50x",
        ),
        Row(
            "DICOM delivered, whole ZIP, warm (image MiB/s)",
            mib_s(image_bytes, median("zip_warm")),
            mib_s(image_bytes, median("read_warm")),
            "{:.0f}",
        ),
        Row(
            "DICOM delivered, whole ZIP, evicted (image MiB/s)",
            mib_s(image_bytes, median("zip_cold")),
            mib_s(image_bytes, median("read_cold")),
            "{:.0f}",
        ),
        Row(
            "ZIP ?viewer=0, warm (MiB/s)",
            mib_s(bare_bytes, median("bare_warm")),
            mib_s(image_bytes, median("read_warm")),
            "{:.0f}",
            ">= 0.50x",
        ),
        Row(
            "ZIP ?viewer=0, evicted (MiB/s)",
            mib_s(bare_bytes, median("bare_cold")),
            mib_s(image_bytes, median("read_cold")),
            "{:.0f}",
            ">= 0.80x",
        ),
        Row("wall time, warm (s)", median("zip_warm"), median("read_warm")),
        Row("wall time, evicted (s)", median("zip_cold"), median("read_cold")),
        Row("wall time, ?viewer=0, warm (s)", median("bare_warm"), median("read_warm")),
        Row("wall time, ?viewer=0, evicted (s)", median("bare_cold"), median("read_cold")),
        Row("wall time, first download (frames made) (s)", first_download["wall_s"], None),
        Row("time to first byte, warm (s)", first_byte, None),
        Row("throughput after the first byte, warm (MiB/s)", streamed, None, "{:.0f}"),
        Row("ZIP size / image bytes", zip_bytes / image_bytes, None, "{:.4f}"),
        Row("ZIP ?viewer=0 size / image bytes", bare_bytes / image_bytes, None, "{:.4f}"),
        Row(
            "gunicorn peak RSS over idle (MiB)",
            (server.peak_bytes - server.idle_bytes) / MiB,
            None,
            "{:+.0f}",
        ),
    ]
    section.notes.append(
        f"median of {ZIP_REPEATS}: GET /studies/<uuid>/download/ (signed in through the login "
        "form) read to the last byte vs reading the stored files in 1 MiB chunks; 'evicted': "
        "posix_fadvise(DONTNEED) on the stored files before each. Time to first byte is "
        "export_plan (sizes checked, the DICOMDIR built or taken from its cache) before streaming."
    )
    section.notes.append(
        "'throughput' is the whole ZIP's bytes (images, DICOMDIR and the disc viewer: INDEX.HTM, "
        "VIEWER/ and a frame file per image) per second; 'DICOM delivered' is the image bytes of "
        "the same downloads per second, the like-for-like with reading the image files. "
        "'?viewer=0' is the ZIP without the disc viewer. Evicted Relay runs also evict the "
        "study's renders and kept frame files; the first download (which makes and keeps the "
        "frame files) is timed apart."
    )
    section.raw = runs | {"first_download": [first_download]}
    return section


# --- 4. CD image --------------------------------------------------------------------------------


def cd_section(wb: Workbench) -> Section:
    relay, study = wb.need()
    files = wb.stored_files()
    section = Section(
        key="cd",
        title="4. CD image of the study (iso_build into a temporary file)",
        relay_label="Relay",
        peer_label="cat > file",
    )
    tmp = tempfile.mkdtemp(prefix="relay-bench-iso-")
    wb.stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    result = relay.task("export", study_uuid=study["uuid"], tmp_dir=tmp)
    copy_s, copied = disk_copy(files, tmp)
    iso_mib = result["iso_bytes"] / MiB
    zip_mib_s = result["zip_bytes"] / MiB / result["zip_s"]
    section.rows = [
        Row("iso_build (s)", result["iso_s"], copy_s, aim="time to build"),
        Row(
            "iso_build (MiB/s of image)", iso_mib / result["iso_s"], copied / MiB / copy_s, "{:.0f}"
        ),
        Row("export_plan: headers + DICOMDIR (s)", result["plan_s"], None),
        Row("iso_size (s)", result["iso_size_s"], None),
        Row(
            "plan + size + build (s)",
            result["plan_s"] + result["iso_size_s"] + result["iso_s"],
            None,
        ),
        Row("image size (MiB)", iso_mib, copied / MiB, "{:.1f}"),
        Row("zip_stream in-process (MiB/s)", zip_mib_s, None, "{:.0f}"),
        Row(
            "process RSS after django.setup() (MiB)",
            result["rss_after_setup"] / MiB,
            None,
            "{:.0f}",
        ),
        Row("process peak RSS (MiB)", result["rss_peak"] / MiB, None, "{:.0f}"),
    ]
    if result["iso_bytes"] != result["iso_expected_bytes"]:
        section.notes.append(
            f"iso_size said {result['iso_expected_bytes']} bytes, the image has {result['iso_bytes']}"
        )
    section.notes.append(
        "in one process in Relay's environment (export_plan, zip_stream read to the end, "
        "iso_size, iso_build); the media task also saves the image to storage (not timed). "
        "Peer: the same image files concatenated into one temporary file."
    )
    section.raw = result
    return section
