"""Prometheus metrics (README: Metrics): what every Relay process counts, and how the counts of
a node's processes add up.

The metric objects live here, in the app every other app may import, so that the places that
count (ingest, the gateway, the push, e-mail, storage_verify, Celery's signals, the HTTP
middleware) need not import the project package. Labels hold bounded sets of words (an entry
point, an outcome, a task or view name, an exception class): never a patient, a facility, an
AE title, an address or a path.

Counting across processes. Production runs several processes per node: gunicorn's pre-forked
web workers, each Celery worker's pool, the gateway's `--processes`. prometheus_client's
multiprocess mode keeps each process's values in a small memory-mapped file in one folder per
node (RELAY_METRICS_DIR, default var/metrics), and a scrape adds up the files of every process,
living or dead, so counters never go back when a worker is recycled. We chose that over an
exporter port per process because a port per worker cannot be scraped through gunicorn's one
listening socket, and pre-forked workers come and go. Each kind of process names its files by a
role (`web`, `worker.<node name>`, `gateway.<port>`) and its pid, and wipes only its own role's
files when it starts (`metrics_process_start`), so that restarting the web server leaves the
Celery worker's counts alone. Processes that never call it (the development server, tests,
one-off commands) count in memory, and their /metrics shows their own counts only.

Serving: /metrics on a web node (relay.metrics) shows every file of the node's folder, so one
scrape per node sees its web workers, Celery workers and gateway. A node without a web server
serves the same on RELAY_METRICS_PORT from its Celery worker or gateway (`metrics_exporter_start`).
Either refuses a scrape unless RELAY_METRICS_TOKEN or RELAY_METRICS_ALLOW is set and the scrape
meets them: queue depths and failure counts are operational data next to patient data.
"""

from __future__ import annotations

import glob
import hmac
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from .addresses import address_listed

log = logging.getLogger(__name__)
# No *_created sample beside each counter: Prometheus does not need them, and in multiprocess
# mode they are never exported, so a process counting in memory shows what production shows.
disable_created_metrics()

# --- HTTP (relay.metrics.MetricsMiddleware) -------------------------------------------------------

HTTP_REQUESTS = Counter(
    "relay_http_requests",
    "HTTP requests answered, by view (URL name), method and status code.",
    ["view", "method", "status"],
)
# Pages should answer in well under a second; uploads and downloads of whole studies take
# minutes, hence the long tail of buckets.
HTTP_LATENCY = Histogram(
    "relay_http_request_duration_seconds",
    "Time from the request reaching Django to its answer (a streamed answer: to its first byte).",
    ["view", "method"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 300),
)

# --- ingest (transfers.ingest) --------------------------------------------------------------------

INGEST_INSTANCES = Counter(
    "relay_ingest_instances",
    "Instances received, by entry point and outcome "
    "(stored, duplicate, conflict, rejected, unavailable).",
    ["entry", "outcome"],
)
INGEST_BYTES = Counter(
    "relay_ingest_bytes",
    "Bytes of the instances received, by entry point and outcome.",
    ["entry", "outcome"],
)
STORAGE_ERRORS = Counter(
    "relay_storage_errors",
    "Writes to the image store that failed (disk full, bucket unreachable), by operation.",
    ["operation"],
)
# The entry points, as `instance_ingest(source=...)` names them; `relay send` is the upload API
# with the uploader's User-Agent, and every gateway source starts with "dicom".
_ENTRIES = {"browser": "browser", "api": "api", "dicomweb": "stow_rs", "deidentify": "deidentify"}
UPLOADER_AGENT = "relay-uploader/"


def ingest_entry(source: str, user_agent: str = "") -> str:
    """The entry point an ingest `source` stands for: one of a few fixed words."""
    if source == "api" and user_agent.startswith(UPLOADER_AGENT):
        return "relay_send"
    if source.startswith(("dicom:", "dicoms:")):
        return "c_store"
    return _ENTRIES.get(source, "other")


def ingest_measure(*, source: str, user_agent: str, outcome: str, size: int) -> None:
    entry = ingest_entry(source, user_agent)
    INGEST_INSTANCES.labels(entry=entry, outcome=outcome).inc()
    if size:
        INGEST_BYTES.labels(entry=entry, outcome=outcome).inc(size)


# --- Celery (relay.celery's signal receivers) -----------------------------------------------------

TASK_FAILURES = Counter(
    "relay_task_failures", "Celery tasks that raised (and will not be retried), by task.", ["task"]
)
TASK_RETRIES = Counter("relay_task_retries", "Celery task retries asked for, by task.", ["task"])

# --- PACS push, e-mail, stored copies -------------------------------------------------------------

PUSHES_FINISHED = Counter(
    "relay_push_finished",
    "Pushes into a PACS that ended, by outcome (done, partial, failed).",
    ["outcome"],
)
PUSH_ATTEMPTS_FAILED = Counter(
    "relay_push_attempt_failures",
    "Push attempts that could not reach the PACS or were told to try later (each is retried).",
)
EMAILS_SENT = Counter("relay_email_sent", "E-mail messages handed to the mail server.")
EMAIL_FAILURES = Counter(
    "relay_email_failures",
    "Attempts to send an e-mail that failed, by exception class (OSError ones are retried).",
    ["error"],
)
STORAGE_VERIFY_CHECKED = Counter(
    "relay_storage_verify_checked", "Stored objects storage_verify read back and hashed."
)
STORAGE_VERIFY_FINDINGS = Counter(
    "relay_storage_verify_findings",
    "Problems storage_verify found, by kind (missing, corrupt, extra).",
    ["kind"],
)
INTEGRITY_FAILURES = Counter(
    "relay_integrity_failures",
    "Stored objects found damaged or missing, by where (viewer, zip, push, storage_verify...).",
    ["where"],
)

# --- the DICOM gateway ----------------------------------------------------------------------------

GATEWAY_ACCEPTED = Counter("relay_gateway_associations_accepted", "Associations let in.")
GATEWAY_REJECTED = Counter(
    "relay_gateway_associations_rejected",
    "Associations refused, by reason (called_ae, calling_ae, not_allowed, limit, unavailable, "
    "tls).",
    ["reason"],
)
# Summed over the gateway's living processes (a process that ended counts no more).
GATEWAY_ACTIVE = Gauge(
    "relay_gateway_associations_active",
    "Associations open now.",
    multiprocess_mode="livesum",
)


_UNLABELLED = [
    PUSH_ATTEMPTS_FAILED,
    EMAILS_SENT,
    STORAGE_VERIFY_CHECKED,
    GATEWAY_ACCEPTED,
    GATEWAY_ACTIVE,
]

# --- counting across processes --------------------------------------------------------------------

_ROLE_UNSAFE = re.compile(r"[^A-Za-z0-9.]")


def metrics_process_start(role: str, directory: Path) -> None:
    """From now on this process (and the processes it forks) counts in files under `directory`
    named by `role` and pid; the files an earlier run of the same role left are removed.

    Call it in the parent before it forks and before anything is counted: gunicorn's master
    (relay/gunicorn_conf.py), a Celery worker's main process, the gateway's first process.
    Values made before it stay in this process's memory."""
    role = _ROLE_UNSAFE.sub(".", role)
    directory.mkdir(parents=True, exist_ok=True)
    # prometheus_client's file names are <kind>_<identifier>.db: no "_" in the identifier, and
    # a "-" after the role so that one role's wipe never matches another role's files.
    for stale in glob.glob(os.path.join(glob.escape(str(directory)), f"*_{role}-*.db")):
        Path(stale).unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue(lambda: f"{role}-{os.getpid()}")
    # A metric without labels made its value when this module was imported, in memory: make it
    # again in a file. (Labelled ones make a value per label set when first counted.)
    for metric in _UNLABELLED:
        metric._metric_init()
    global _ROLE
    _ROLE = role


_ROLE = ""


def metrics_process_dead(pid: int) -> None:
    """A child of this process ended: its live gauges (open associations) count no more."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if _ROLE and directory:
        mark_process_dead(f"{_ROLE}-{pid}", directory)


def metrics_multiprocess() -> bool:
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class _ThisProcess(Collector):
    """Everything registered in this process (when it counts in memory)."""

    def collect(self) -> Iterable[Any]:
        return REGISTRY.collect()


def metrics_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """What a scrape shows: every process's files on this node (or this process's own counts)
    and the `extra` collectors, which read their values when scraped (queue depths...)."""
    registry = CollectorRegistry()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_multiprocess() and directory:
        MultiProcessCollector(registry, path=directory)
    else:
        registry.register(_ThisProcess())
    for collector in extra:
        registry.register(collector)
    return registry


# --- who may scrape -------------------------------------------------------------------------------

OFF = "off"
# Refused scrapes per address in this window before even a right token is refused (429).
REFUSALS_ALLOWED = 10
REFUSAL_WINDOW_S = 15 * 60


def metrics_refusal(*, authorization: str, address: str) -> str | None:
    """None when this scrape may read the metrics; OFF when no RELAY_METRICS_TOKEN or
    RELAY_METRICS_ALLOW is set (the endpoint is off: refused by default); otherwise why not."""
    from django.conf import settings

    token: str = settings.RELAY_METRICS_TOKEN
    allowed: list[str] = settings.RELAY_METRICS_ALLOW
    if not token and not allowed:
        return OFF
    if allowed and not address_listed(address, allowed):
        return "address not allowed"
    if token:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return "no or wrong bearer token"
    return None


def metrics_blocked(address: str) -> bool:
    """This address was refused too often lately (a token being guessed)."""
    from django.core.cache import cache

    return int(cache.get(f"metrics-refused:{address}", 0)) >= REFUSALS_ALLOWED


def metrics_refused_record(*, address: str, reason: str, request: Any = None) -> None:
    """Count the refusal against the address and audit it (ACCESS_DENIED, as every refusal
    is), except while the address is blocked: a misconfigured scraper every 15 s must not fill
    the trail."""
    from django.core.cache import cache
    from django.db import DatabaseError

    from .audit import audit_record
    from .models import AuditAction, Outcome

    key = f"metrics-refused:{address}"
    cache.add(key, 0, REFUSAL_WINDOW_S)
    try:
        count = cache.incr(key)
    except ValueError:  # expired between the two calls
        count = 1
        cache.set(key, count, REFUSAL_WINDOW_S)
    if count > REFUSALS_ALLOWED:
        return
    log.warning("metrics: refused a scrape from %s: %s", address, reason)
    try:
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            address=address,
            outcome=Outcome.FAILURE,
            detail={"reason": reason, "page": "metrics"},
        )
    except DatabaseError:
        log.exception("metrics: could not audit a refused scrape")


# --- the exporter of a node without a web server --------------------------------------------------


def metrics_exporter_start(*, bind: str, port: int) -> threading.Thread | None:
    """Serve this node's metrics on `bind`:`port` from a thread of this process (a Celery
    worker's or the gateway's parent), with the same rules as /metrics. None when the port is
    taken: another process of the node serves it already. Queue depths and the last scrub are
    read by the web nodes' /metrics only (one broker and one database for all nodes)."""
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    served = make_wsgi_app(_LazyRegistry())

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        from django.db import connections

        try:
            return answer(environ, start_response)
        finally:
            # Each scrape runs in a thread of its own: its database connection goes with it.
            connections.close_all()

    def answer(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        address = environ.get("REMOTE_ADDR", "")
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not found.\n"]
        if metrics_blocked(address):
            start_response("429 Too Many Requests", [("Content-Type", "text/plain")])
            return [b"Too many refused scrapes from this address; try again later.\n"]
        refusal = metrics_refusal(
            authorization=environ.get("HTTP_AUTHORIZATION", ""), address=address
        )
        if refusal == OFF:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not found.\n"]
        if refusal is not None:
            metrics_refused_record(address=address, reason=refusal)
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"Refused.\n"]
        return served(environ, start_response)  # type: ignore[no-any-return]

    try:
        server = make_server(
            bind, port, app, server_class=ThreadingWSGIServer, handler_class=_SilentHandler
        )
    except OSError as exc:
        log.info("metrics: not serving on %s:%d (%s)", bind, port, exc)
        return None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics: serving this node's metrics on %s:%d", bind, port)
    return thread


class _LazyRegistry(Collector):
    """The registry of `metrics_registry`, made at each scrape (the folder's files change)."""

    def collect(self) -> Iterator[Any]:
        return iter(metrics_registry().collect())
