"""Where Relay may connect to as a DICOM client (push and "Test connection").

A facility admin types a PACS's host and port; the server then connects there. Without a check,
that lets an admin reach addresses that are not PACS at all: the cloud's instance metadata
service (169.254.169.254, fd00:ec2::254), link-local, multicast or unspecified addresses. The
host is resolved when a destination is saved and again at every connection (a DNS answer can
change), every address it resolves to must be allowed, and the connection goes to the address
that was checked, not to the name.

RELAY_OUTBOUND_DENIED_NETWORKS (comma-separated CIDRs) replaces the default list;
RELAY_OUTBOUND_ALLOWED_NETWORKS, when set, is the only space allowed (e.g. the hospital's PACS
subnets). Loopback and private networks are allowed by default: a PACS is usually on one.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from django.conf import settings

DEFAULT_DENIED = (
    "0.0.0.0/8",  # "this network", including 0.0.0.0
    "169.254.0.0/16",  # link-local, including the cloud metadata service 169.254.169.254
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, including the broadcast address
    "::/128",  # unspecified
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
    "fd00:ec2::254/128",  # AWS's metadata service over IPv6
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class OutboundRefused(Exception):
    """The destination may not be connected to; the message says why (no secret in it)."""


def _networks(values: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip()]


def _setting(name: str, default: Iterable[str]) -> list[Network]:
    value = getattr(settings, name, None)
    if value is None:
        return _networks(default)
    if isinstance(value, str):
        value = value.split(",")
    return _networks(value)


def _resolve(host: str, port: int) -> list[str]:
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundRefused(f"{host} does not resolve ({exc})") from exc
    addresses: list[str] = []
    for *_, sockaddr in answers:
        address = str(sockaddr[0]).split("%")[0]
        if address not in addresses:
            addresses.append(address)
    return addresses


def outbound_address(host: str, port: int) -> str:
    """The checked address to connect to for `host:port`, or OutboundRefused."""
    if not 0 < int(port) < 65536:
        raise OutboundRefused(f"{port} is not a TCP port")
    denied = _setting("RELAY_OUTBOUND_DENIED_NETWORKS", DEFAULT_DENIED)
    allowed = _setting("RELAY_OUTBOUND_ALLOWED_NETWORKS", ())
    addresses = _resolve(host, port)
    for address in addresses:
        ip = ipaddress.ip_address(address)
        mapped = getattr(ip, "ipv4_mapped", None)
        candidates = [ip, mapped] if mapped is not None else [ip]
        for candidate in candidates:
            if any(candidate in network for network in denied):
                raise OutboundRefused(f"{host} ({address}) is in a network Relay does not call")
        if allowed and not any(c in network for c in candidates for network in allowed):
            raise OutboundRefused(f"{host} ({address}) is outside the networks Relay may call")
    return addresses[0]
