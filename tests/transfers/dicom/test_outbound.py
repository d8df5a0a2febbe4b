"""Where the server may connect as a DICOM client: "Test connection" and pushes go only to saved
destinations, never to the cloud's metadata service, link-local, multicast or unspecified
addresses (settings narrow or widen the space), checked at save and at every connection, and
the test button is rate-limited."""

from __future__ import annotations

import socket

import pytest

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for
from transfers.dicom.outbound import OutboundRefused, outbound_address
from transfers.dicom.push import destination_echo
from transfers.models import PacsDestination

DICOM = "/facilities/krmc/dicom/"

pytestmark = pytest.mark.django_db


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "0.0.0.0",  # noqa: S104 (the address an admin types, refused)
        "fe80::1",
        "224.0.0.1",
        "fd00:ec2::254",
    ],
)
def test_an_admin_cannot_point_a_destination_at_the_metadata_service_or_link_local(
    alice: User, krmc: Facility, host: str
) -> None:
    response = client_for(alice).post(
        DICOM + "destinations/", {"name": "X", "ae_title": "PACS", "host": host, "port": 80}
    )
    assert response.status_code == 200
    assert b"Relay will not connect there" in response.content
    assert not PacsDestination.objects.exists()
    refused = AuditEvent.objects.get(action=AuditAction.DESTINATION_ADD)
    assert (refused.outcome, refused.detail["host"]) == ("failure", host)


def test_a_pacs_on_the_local_network_or_this_host_is_fine(alice: User, krmc: Facility) -> None:
    response = client_for(alice).post(
        DICOM + "destinations/",
        {"name": "PACS", "ae_title": "PACS", "host": "127.0.0.1", "port": _closed_port()},
    )
    assert response.status_code == 302
    assert PacsDestination.objects.count() == 1


def test_a_saved_destination_is_checked_again_at_every_connection(krmc: Facility) -> None:
    # Saved before the rule (or its name now resolves elsewhere): the server still refuses.
    destination = PacsDestination.objects.create(
        facility=krmc, name="Old", ae_title="PACS", host="169.254.169.254", port=80
    )
    result = destination_echo(destination=destination)
    assert not result.ok
    assert result.message.startswith("Refused:")


def test_an_allow_list_narrows_where_the_server_connects(settings) -> None:
    settings.RELAY_OUTBOUND_ALLOWED_NETWORKS = "10.0.0.0/8"
    with pytest.raises(OutboundRefused, match="outside the networks"):
        outbound_address("127.0.0.1", 104)
    assert outbound_address("10.1.2.3", 104) == "10.1.2.3"
    settings.RELAY_OUTBOUND_ALLOWED_NETWORKS = ""
    settings.RELAY_OUTBOUND_DENIED_NETWORKS = "127.0.0.0/8"
    with pytest.raises(OutboundRefused, match="does not call"):
        outbound_address("localhost", 104)


def test_the_test_button_is_rate_limited(alice: User, krmc: Facility) -> None:
    destination = PacsDestination.objects.create(
        facility=krmc, name="PACS", ae_title="PACS", host="127.0.0.1", port=_closed_port()
    )
    client = client_for(alice)
    url = f"{DICOM}destinations/{destination.uuid}/echo/"
    pages = [client.post(url, follow=True).content for _ in range(7)]
    assert b"Too many connection tests" not in pages[5]
    assert b"Too many connection tests" in pages[6]
    assert AuditEvent.objects.filter(action=AuditAction.DESTINATION_ECHO).count() == 6
