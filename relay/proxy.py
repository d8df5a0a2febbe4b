"""The client's address behind the TLS proxy (README: Behind a proxy).

gunicorn sets REMOTE_ADDR to the address that opened the connection, which behind nginx or a
load balancer is the proxy's; `--forwarded-allow-ips` does not change it. When the connection
comes from one of `RELAY_TRUSTED_PROXIES`, this middleware takes the client's address from the
X-Forwarded-For the proxy added, so that the audit trail, the sign-in rate limits and the
patient links' blocked-address checks see the person, not the proxy.

The header is read from the right: each trusted proxy appends the address it saw, so the first
address from the right that is not a trusted proxy is the one the outermost trusted proxy was
connected from. Anything left of it was written by the client and is not believed. A connection
that does not come from a trusted proxy keeps its own address whatever headers it sends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def trusted_networks(listing: list[str]) -> list[Network]:
    try:
        return [ipaddress.ip_network(item, strict=False) for item in listing]
    except ValueError as exc:
        raise ImproperlyConfigured(f"RELAY_TRUSTED_PROXIES: {exc}") from None


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_address(remote: str, forwarded_for: str, trusted: list[Network]) -> str:
    """The client's address for a connection from `remote` with this X-Forwarded-For."""
    peer = _address(remote)
    if peer is None or not any(peer in net for net in trusted):
        return remote
    client = peer
    for entry in reversed(forwarded_for.split(",") if forwarded_for else []):
        hop = _address(entry)
        if hop is None:
            break  # a malformed entry: nothing left of it can be placed
        client = hop
        if not any(hop in net for net in trusted):
            break
    return str(client)


class ForwardedForMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.trusted = trusted_networks(settings.RELAY_TRUSTED_PROXIES)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if self.trusted:
            remote = request.META.get("REMOTE_ADDR", "")
            request.META["REMOTE_ADDR"] = client_address(
                remote, request.META.get("HTTP_X_FORWARDED_FOR", ""), self.trusted
            )
        return self.get_response(request)
