"""Behind the TLS proxy the audit trail names the client, not the proxy (relay/proxy.py).

Found by the operator run of issue 18: with gunicorn's `--forwarded-allow-ips='*'` and
`X-Forwarded-For: 198.51.100.23`, a failed sign-in was audited from 127.0.0.1, the proxy.
"""

from __future__ import annotations

import pytest
from django.test import Client, override_settings

from portal.models import AuditEvent, User
from relay.proxy import client_address, trusted_networks

pytestmark = pytest.mark.django_db

CLIENT = "198.51.100.23"


def _failed_sign_in_address(remote: str, forwarded_for: str | None) -> str:
    headers = {"HTTP_X_FORWARDED_FOR": forwarded_for} if forwarded_for is not None else {}
    client = Client(REMOTE_ADDR=remote, **headers)
    answer = client.post("/accounts/login/", {"login": "bob@krmc.example", "password": "wrong"})
    assert answer.status_code == 200
    event = AuditEvent.objects.filter(action="login_failed").latest("pk")
    return str(event.client_ip)


@override_settings(RELAY_TRUSTED_PROXIES=["127.0.0.1", "10.0.0.0/8"])
def test_a_sign_in_through_the_proxy_is_audited_with_the_clients_address(bob: User) -> None:
    assert _failed_sign_in_address("127.0.0.1", CLIENT) == CLIENT
    # Through two proxies of ours (a load balancer, then nginx): the client, not the first proxy.
    assert _failed_sign_in_address("127.0.0.1", f"{CLIENT}, 10.1.2.3") == CLIENT


@override_settings(RELAY_TRUSTED_PROXIES=["127.0.0.1"])
def test_what_a_client_writes_into_the_header_is_not_believed(bob: User) -> None:
    # A client claiming another address in front of the proxy: the proxy appended the real one.
    assert _failed_sign_in_address("127.0.0.1", f"203.0.113.66, {CLIENT}") == CLIENT
    # A client connecting directly (not through the proxy) cannot name an address at all.
    assert _failed_sign_in_address("192.0.2.44", CLIENT) == "192.0.2.44"
    # A header that cannot be read leaves the proxy's own address, not a guess.
    assert _failed_sign_in_address("127.0.0.1", "not-an-address") == "127.0.0.1"


def test_without_trusted_proxies_the_header_is_ignored(bob: User) -> None:
    assert _failed_sign_in_address("127.0.0.1", CLIENT) == "127.0.0.1"


def test_the_walk_from_the_right() -> None:
    trusted = trusted_networks(["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"])
    assert client_address("127.0.0.1", "", trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", " 2001:db8::7 , 10.0.0.9", trusted) == "2001:db8::7"
    assert client_address("10.0.0.2", "10.0.0.1", trusted) == "10.0.0.1"  # all ours
    assert client_address("127.0.0.1", f"{CLIENT}, garbage", trusted) == "127.0.0.1"
