"""Health for load balancers and monitors (README: Health and metrics).

- `GET /health/live/`: 200 while this web process answers. It reads nothing else, so a database
  outage does not make a balancer or a supervisor restart every web process.
- `GET /health/ready/`: 200 when this process can do its work, 503 otherwise: the database
  answers `SELECT 1`, the image store saves, reads back and deletes a small file, the cache
  stores and returns a value, the Celery broker accepts a connection, and each DICOM gateway of
  RELAY_HEALTH_GATEWAYS accepts one. A JSON object names
  each check and says "OK" or what failed, with no address, credential or patient data.

Both answer whatever Host header the request carries and over plain HTTP (`HealthMiddleware`, the
first middleware): a load balancer asks each node by its own address (http://10.0.0.11:8000/...),
which ALLOWED_HOSTS and the HTTPS redirect would otherwise refuse with 400 or 301. They carry no
patient data, no cookie is read and nothing else runs for them.

The checks are django-health-check's (database, storage, cache) and one of ours (the broker).
The library is imported on the first readiness request, not when a worker starts: pages never
load it (tests/relay/test_lean_imports.py keeps workers lean).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import socket
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from relay.headers import answered_first


class HealthMiddleware:
    """Answers the two health paths before any other middleware (see the module's docstring)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        view = _VIEWS.get(request.path_info)
        if view is not None:
            return answered_first(view(request))  # type: ignore[no-any-return]
        return self.get_response(request)


@never_cache
@require_GET
def live(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")


@never_cache
@require_GET
def ready(request: HttpRequest) -> Any:
    return async_to_sync(_ready_view())(request)


@functools.cache
def _ready_view() -> Callable[..., Any]:
    from health_check.base import HealthCheck
    from health_check.exceptions import ServiceUnavailable
    from health_check.views import HealthCheckView

    @dataclasses.dataclass
    class Broker(HealthCheck):
        """The Celery broker accepts a connection (Redis, RabbitMQ or the embedded file)."""

        def run(self) -> None:
            from relay.celery import app

            try:
                with app.connection_for_write() as connection:
                    connection.ensure_connection(max_retries=1, timeout=3)
                    # kombu's virtual transports (Redis, the embedded file) connect lazily:
                    # reading a queue's length reaches the store itself.
                    size = getattr(connection.default_channel, "_size", None)
                    if size is not None:
                        size("quick")
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                raise ServiceUnavailable(f"no connection ({type(exc).__name__})") from None

    @dataclasses.dataclass
    class Gateway(HealthCheck):
        """Each DICOM gateway of RELAY_HEALTH_GATEWAYS accepts a connection. A TCP connect, not
        an association: an association from a calling AE the gateway does not admit is a
        refusal it audits, every few seconds. A full DICOM check is `echoscu` from monitoring,
        with an admitted AE title."""

        def run(self) -> None:
            from django.conf import settings

            for number, address in enumerate(settings.RELAY_HEALTH_GATEWAYS, start=1):
                host, _, port = address.rpartition(":")
                try:
                    socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
                except (OSError, ValueError) as exc:
                    raise ServiceUnavailable(
                        f"gateway {number} refuses connections ({type(exc).__name__})"
                    ) from None

    # Named as the answer shows them ("Broker()", not "_ready_view.<locals>.Broker()").
    Broker.__qualname__, Gateway.__qualname__ = "Broker", "Gateway"

    class Ready(HealthCheckView):
        checks = (
            "health_check.checks.Database",
            "health_check.checks.Storage",
            "health_check.checks.Cache",
            Broker,
            Gateway,
        )

        async def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            with self.get_executor() as executor:
                self.results = await asyncio.gather(
                    *(check.get_result(executor) for check in self.get_checks())
                )
            # 503, what balancers take for "not now"; JSON whatever the Accept header says.
            failed = any(result.error for result in self.results)
            return self.render_to_response_json(503 if failed else 200)

    return Ready.as_view()


_VIEWS: dict[str, Callable[..., Any]] = {"/health/live/": live, "/health/ready/": ready}
