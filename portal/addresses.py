"""Whether an address is one of a listing of addresses and networks (the gateway's senders,
the addresses allowed to scrape /metrics)."""

from __future__ import annotations

import ipaddress


def address_listed(address: str, listing: list[str]) -> bool:
    """An address matches a listed address or network (CIDR); entries that are neither are
    skipped, and an address that does not parse matches nothing."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for item in listing:
        try:
            if ip in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            continue
    return False
