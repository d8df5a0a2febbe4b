"""/metrics for Prometheus (README: Metrics): the HTTP middleware that counts and times every
request, the endpoint, and the values read when a scrape comes (queue depths from the broker,
the last storage_verify run from the database). The counters themselves, and how a node's
processes add them up, are in portal/metrics.py.

The endpoint is off unless RELAY_METRICS_TOKEN (a bearer token Prometheus sends) or
RELAY_METRICS_ALLOW (addresses or networks) is set; a refused scrape is audited (ACCESS_DENIED)
and an address refused too often gets 429 for a while.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseNotFound
from django.urls import Resolver404, resolve
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from portal.metrics import (
    HTTP_LATENCY,
    HTTP_REQUESTS,
    OFF,
    metrics_blocked,
    metrics_refusal,
    metrics_refused_record,
    metrics_registry,
)
from relay.headers import answered_first

log = logging.getLogger(__name__)


class MetricsMiddleware:
    """Counts every answer by view, method and status, and times it; answers /metrics itself.

    Near the top of MIDDLEWARE: after relay.proxy (so that RELAY_METRICS_ALLOW sees the client's
    address, not the load balancer's, which would let anyone through it) and before everything
    that answers on its own (static files, 400, 413, 503), which counts too. /metrics is answered
    here, whatever the Host header and over plain HTTP, as the health endpoints are: Prometheus
    scrapes each node by its own address (http://10.0.0.11:8000/metrics), which ALLOWED_HOSTS and
    the HTTPS redirect would refuse; the token or the address list guards it instead."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        start = time.perf_counter()
        if request.path_info == "/metrics":
            response = answered_first(metrics(request))
            view = "metrics"
        else:
            response = self.get_response(request)
            view = _view_name(request, response.status_code)
        # Only the methods Relay answers: anything else is one word, not a label per spelling.
        method = request.method if request.method in _METHODS else "other"
        HTTP_LATENCY.labels(view=view, method=method).observe(time.perf_counter() - start)
        HTTP_REQUESTS.labels(view=view, method=method, status=str(response.status_code)).inc()
        return response


_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def _view_name(request: HttpRequest, status: int) -> str:
    """The URL's name (a bounded set, no identifiers). An answer a middleware gave before the URL
    was resolved is named by resolving it now ("static" for WhiteNoise's files); "unresolved"
    when no URL matches (404s: the paths scanners try are not labels)."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        if request.path_info.startswith("/" + settings.STATIC_URL.lstrip("/")):
            return "static"
        if status == 404:
            return "unresolved"
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return "unresolved"
    return str(match.view_name)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    address = request.META.get("REMOTE_ADDR", "")
    if metrics_blocked(address):
        return HttpResponse(
            "Too many refused scrapes from this address; try again later.\n",
            status=429,
            content_type="text/plain",
        )
    refusal = metrics_refusal(
        authorization=request.META.get("HTTP_AUTHORIZATION", ""), address=address
    )
    if refusal == OFF:
        return HttpResponseNotFound("Not found.\n", content_type="text/plain")
    if refusal is not None:
        metrics_refused_record(address=address, reason=refusal, request=request)
        return HttpResponse("Refused.\n", status=403, content_type="text/plain")
    registry = metrics_registry(extra=scrape_collectors())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def scrape_collectors() -> list[Collector]:
    """The values read when a scrape comes rather than counted as things happen."""
    return [QueueDepths(), StorageVerifyLastRun()]


class QueueDepths(Collector):
    """Tasks waiting in each Celery queue (relay/celery.py's quick, slow and render), read from
    the broker: a Redis list's length, a passive queue_declare on RabbitMQ, the rows of the
    embedded SQLite broker. Unreachable broker: relay_broker_up 0 and no depths."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("relay_broker_up", "1 when the Celery broker answered this scrape.")
        depth = GaugeMetricFamily(
            "relay_queue_depth",
            "Tasks waiting in a Celery queue (not those a worker holds).",
            labels=["queue"],
        )
        try:
            for name, size in queue_depths().items():
                depth.add_metric([name], size)
        except Exception as exc:  # noqa: BLE001 - any failure means no answer
            log.warning("metrics: broker unreachable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield depth


def queue_depths() -> dict[str, int]:
    """Queue name -> tasks waiting; a queue the broker does not know yet is left out."""
    from relay.celery import app

    names = [queue.name for queue in app.conf.task_queues or ()]
    sizes: dict[str, int] = {}
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
        channel: Any = connection.channel()
        try:
            for name in names:
                # kombu's virtual transports (Redis, the embedded broker) count themselves.
                size = getattr(channel, "_size", None)
                if size is not None:
                    sizes[name] = int(size(name))
                    continue
                try:
                    declared = channel.queue_declare(queue=name, passive=True)
                except connection.channel_errors:
                    # RabbitMQ closes the channel on a queue it does not have (no worker yet).
                    channel = connection.channel()
                    continue
                sizes[name] = int(declared.message_count)
        finally:
            channel.close()
    return sizes


class StorageVerifyLastRun(Collector):
    """The last finished storage_verify of the whole store, from the database (so a worker's
    restart does not hide its findings): what it found by kind and when it finished."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from django.db import DatabaseError

        from transfers.models.studies import StorageVerifyRun

        database = GaugeMetricFamily(
            "relay_database_up", "1 when the database answered this scrape."
        )
        try:
            run: Any = (
                StorageVerifyRun.objects.filter(
                    facility=None, since=None, finished_at__isnull=False
                )
                .order_by("-finished_at")
                .values("finished_at", "missing", "corrupt", "extra")
                .first()
            )
        except DatabaseError as exc:
            log.warning("metrics: database unreachable (%s)", type(exc).__name__)
            database.add_metric([], 0)
            yield database
            return
        database.add_metric([], 1)
        yield database
        if run is None:
            return
        findings = GaugeMetricFamily(
            "relay_storage_verify_last_run_findings",
            "What the last finished storage_verify of the whole store found, by kind.",
            labels=["kind"],
        )
        for kind in ("missing", "corrupt", "extra"):
            findings.add_metric([kind], run[kind])
        yield findings
        yield GaugeMetricFamily(
            "relay_storage_verify_last_run_finished_timestamp_seconds",
            "When the last finished storage_verify of the whole store finished (Unix time).",
            value=run["finished_at"].timestamp(),
        )
