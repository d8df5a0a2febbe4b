"""What the benchmark measures: a server's memory while it works, and the upload of a series.

The same client code uploads to Relay and to Orthanc, so that the two servers are compared and
not two clients: 4 threads (a desktop uploader's concurrency), one HTTP connection per thread,
every file sent as its raw bytes with an explicit Content-Length.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

MiB = 1024 * 1024


class UploadFailed(RuntimeError):
    """A server gave an answer other than the one expected for a fresh instance."""


class RssSampler:
    """Samples the resident memory of a process and all its descendants in a thread.

    gunicorn's master forks the workers, so the server's footprint is the sum over the tree;
    Orthanc is one process and the same code gives its own RSS. RSS of forked workers counts
    pages they still share with the master once per process, so the sum is an upper bound:
    Relay's master loads the application before forking (relay/gunicorn_conf.py), so most of
    a worker's pages are shared. Before the upload the sampler also reads the tree's
    proportional set size (PSS: each page once, split between the processes sharing it), what
    the processes really hold.
    """

    def __init__(self, pid: int, interval: float = 0.05, rescan_every: int = 20) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        # Finding descendants walks /proc; doing it every 50 ms on a small machine would take CPU
        # from the servers being measured, so the tree is re-read once a second (every 20
        # samples), which still catches a gunicorn worker being replaced.
        self.rescan_every = rescan_every
        self.idle_bytes = 0  # before the upload starts
        self.idle_pss_bytes = 0  # the same, shared pages counted once
        self.peak_bytes = 0
        self.cpu_start = self.cpu_end = 0.0
        self.samples = 0
        # (perf_counter, bytes) of every sample: memory over time, e.g. first half vs second.
        self.timeline: list[tuple[float, int]] = []
        self._procs: list[psutil.Process] = []
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _rescan(self) -> None:
        try:
            self._procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            self._procs = []

    def sample(self) -> int:
        """The current RSS sum in bytes (and remember each process's CPU time)."""
        total = 0
        for proc in self._procs:
            try:
                with proc.oneshot():
                    total += proc.memory_info().rss
                    cpu = proc.cpu_times()
                    self._cpu[proc.pid] = cpu.user + cpu.system
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue  # a worker that exited between the scan and now
        return total

    def pss(self) -> int:
        """The tree's proportional set size in bytes (reads every process's smaps: not sampled
        while the server works)."""
        total = 0
        for proc in self._procs:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU time of every process seen so far (exited ones at their last sample)."""
        return sum(self._cpu.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.samples % self.rescan_every == 0:
                self._rescan()
            now = self.sample()
            self.timeline.append((time.perf_counter(), now))
            self.peak_bytes = max(self.peak_bytes, now)
            self.samples += 1
            self._stop.wait(self.interval)

    def peak_between(self, start: float, end: float) -> int:
        """The highest sample taken between two perf_counter() instants (0 if none)."""
        return max((rss for at, rss in self.timeline if start <= at <= end), default=0)

    def __enter__(self) -> RssSampler:
        self._rescan()
        self.idle_bytes = self.sample()
        self.idle_pss_bytes = self.pss()
        self.cpu_start = self.cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._rescan()
        self.peak_bytes = max(self.peak_bytes, self.sample())
        self.cpu_end = self.cpu_seconds()


@dataclass
class UploadRun:
    """The measurements of one series uploaded to one server."""

    server: str
    files: int
    total_bytes: int
    wall_s: float
    idle_rss_bytes: int
    idle_pss_bytes: int
    peak_rss_bytes: int
    server_cpu_s: float
    latencies_s: list[float] = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput_mib_s(self) -> float:
        return self.total_bytes / MiB / self.wall_s

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "server": self.server,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "total_mib": round(self.total_bytes / MiB, 2),
            "wall_s": round(self.wall_s, 3),
            "throughput_mib_s": round(self.throughput_mib_s, 2),
            "files_per_s": round(self.files / self.wall_s, 2),
            "idle_rss_mib": round(self.idle_rss_bytes / MiB, 1),
            "idle_pss_mib": round(self.idle_pss_bytes / MiB, 1),
            "peak_rss_mib": round(self.peak_rss_bytes / MiB, 1),
            "server_cpu_s": round(self.server_cpu_s, 2),
            "latency_median_s": round(statistics.median(lat), 4),
            "latency_p95_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.95))], 4),
            "latency_max_s": round(lat[-1], 4),
            **self.extra,
        }


# Check one answer: raise UploadFailed with the reason if it is not what a fresh store gives.
AnswerCheck = Callable[[Path, httpx.Response], None]


def upload_series(
    *,
    server: str,
    url: str,
    headers: dict[str, str],
    files: list[Path],
    check: AnswerCheck,
    server_pid: int,
    threads: int = 4,
    timeout_s: float = 300.0,
) -> UploadRun:
    """POST every file to `url` from `threads` threads while sampling the server's memory."""
    local = threading.local()
    clients: list[httpx.Client] = []
    clients_lock = threading.Lock()
    failed = threading.Event()
    latencies: list[float] = []

    def client() -> httpx.Client:
        # One client (one keep-alive connection) per thread: nothing shared between threads.
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=timeout_s)
            with clients_lock:
                clients.append(local.client)
        return local.client

    def send(path: Path) -> None:
        if failed.is_set():
            return  # another file already failed; do not keep loading the server
        body = path.read_bytes()
        request_headers = {
            **headers,
            "Content-Type": "application/dicom",
            "Content-Length": str(len(body)),
        }
        started = time.perf_counter()
        try:
            response = client().post(url, content=body, headers=request_headers)
            check(path, response)
        except Exception:
            failed.set()
            raise
        latencies.append(time.perf_counter() - started)  # list.append is atomic under the GIL

    total_bytes = sum(path.stat().st_size for path in files)
    try:
        with (
            RssSampler(server_pid) as sampler,
            ThreadPoolExecutor(threads, thread_name_prefix="upload") as pool,
        ):
            started = time.perf_counter()
            futures = [pool.submit(send, path) for path in files]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                if future.done() and future.exception() is not None:
                    failed.set()
                    for other in futures:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
            wait(futures)
            wall = time.perf_counter() - started
    finally:
        for c in clients:
            c.close()
    if len(latencies) != len(files):
        raise UploadFailed(f"{server}: {len(latencies)} of {len(files)} uploads completed")
    return UploadRun(
        server=server,
        files=len(files),
        total_bytes=total_bytes,
        wall_s=wall,
        idle_rss_bytes=sampler.idle_bytes,
        idle_pss_bytes=sampler.idle_pss_bytes,
        peak_rss_bytes=sampler.peak_bytes,
        server_cpu_s=sampler.cpu_end - sampler.cpu_start,
        latencies_s=latencies,
    )


# Peak memory is the worst case over the repeats; everything else is the median run's value,
# which is what a busy shared machine (CI, several engineers) can measure reproducibly.
_WORST = {"peak_rss_mib"}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of results out of the repeats of the same upload to the same kind of server."""
    summary = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [run[key] for run in runs]
            summary[key] = max(values) if key in _WORST else statistics.median(values)
    summary["repeats"] = len(runs)
    summary["wall_s_all"] = [run["wall_s"] for run in runs]
    summary["wall_s_min"] = min(summary["wall_s_all"])
    return summary


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (fraction 0.5: median, 0.95: p95) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# --- results of the DICOM, media and viewer sections --------------------------------------------


@dataclass
class Row:
    """One line of a section's table: Relay's value, the peer's value, and what is aimed for.

    `aim` is a bound on Relay / peer ("<= 1.00": Relay at most as slow; ">= 0.50": at least
    half as fast), or a free text; the ratio column is always Relay / peer."""

    label: str
    relay: float | None
    peer: float | None = None
    fmt: str = "{:.2f}"
    aim: str = ""

    def cells(self) -> list[str]:
        relay = "-" if self.relay is None else self.fmt.format(self.relay)
        peer = "-" if self.peer is None else self.fmt.format(self.peer)
        ratio = f"{self.relay / self.peer:.2f}x" if self.relay is not None and self.peer else "-"
        return [self.label, relay, peer, ratio, self.aim]

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "relay": self.relay, "peer": self.peer, "aim": self.aim}


@dataclass
class Section:
    """A section's table: its title, what "Relay" and "peer" are, rows, and notes under it.
    `error` is set instead when the section could not be measured."""

    key: str
    title: str
    relay_label: str = "Relay"
    peer_label: str = "peer"
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "relay": self.relay_label,
            "peer": self.peer_label,
            "rows": [row.as_dict() for row in self.rows],
            "notes": self.notes,
            "error": self.error,
            "raw": self.raw,
        }


def aim_table(title: str, rows: list[tuple[str, str, str]]) -> str:
    """A Markdown table of (what, value, aim) rows under `title` (the billing and purge
    sections)."""
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"| {title:{width}} | value | aim |",
        f"|{'-' * (width + 2)}|-------|-----|",
    ]
    lines += [f"| {name:{width}} | {value} | {aim} |" for name, value, aim in rows]
    return "\n".join(lines)
