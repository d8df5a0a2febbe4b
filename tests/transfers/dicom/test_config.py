"""The facility admin's DICOM configuration: one POST URL per change, each change audited with
its values before and after, visible on the facility's audit log, and nobody else's to make."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for
from transfers.models import PacsDestination, RoutingRule

DICOM = "/facilities/krmc/dicom/"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _event(action: str) -> AuditEvent:
    return AuditEvent.objects.get(action=action)


@pytest.mark.django_db
def test_it_audits_a_change_of_gateway_access_with_before_and_after(
    alice: User, krmc: Facility
) -> None:
    Facility.objects.filter(pk=krmc.pk).update(gateway_calling_aes="OLDPACS")
    response = client_for(alice).post(
        DICOM + "gateway/", {"gateway_calling_aes": "CT1 CT2", "gateway_addresses": "10.0.0.0/8"}
    )
    assert response.status_code == 302
    event = _event(AuditAction.GATEWAY_CHANGE)
    assert (event.actor, event.facility) == (alice, krmc)
    unchanged = {"client_certificates": "", "tls_required": False}
    assert event.detail["before"] == {"calling_aes": "OLDPACS", "addresses": "", **unchanged}
    assert event.detail["after"] == {
        "calling_aes": "CT1 CT2",
        "addresses": "10.0.0.0/8",
        **unchanged,
    }


@pytest.mark.django_db
def test_it_audits_adding_testing_and_removing_a_destination(alice: User, krmc: Facility) -> None:
    client = client_for(alice)
    port = _closed_port()
    added = client.post(
        DICOM + "destinations/",
        {"name": "Main PACS", "ae_title": "KRMCPACS", "host": "127.0.0.1", "port": port},
    )
    assert added.status_code == 302
    destination = PacsDestination.objects.get()
    event = _event(AuditAction.DESTINATION_ADD)
    assert event.detail["before"] is None
    assert event.detail["after"]["ae_title"] == "KRMCPACS"
    assert event.detail["after"]["port"] == port

    # Nothing listens on that port: the test fails, and the failure is on the record.
    tested = client.post(f"{DICOM}destinations/{destination.uuid}/echo/", follow=True)
    event = _event(AuditAction.DESTINATION_ECHO)
    assert event.detail["after"]["ok"] is False
    assert event.detail["after"]["message"] == f"No answer from 127.0.0.1:{port}"
    assert f"Main PACS: No answer from 127.0.0.1:{port}" in tested.content.decode()
    assert event.detail["destination"] == str(destination.uuid)

    removed = client.post(f"{DICOM}destinations/{destination.uuid}/delete/")
    assert removed.status_code == 302
    assert not PacsDestination.objects.exists()
    event = _event(AuditAction.DESTINATION_REMOVE)
    assert event.detail["before"]["name"] == "Main PACS"
    assert event.detail["after"] is None


@pytest.mark.django_db
def test_it_audits_adding_and_removing_a_routing_rule(
    alice: User, krmc: Facility, gfc: Facility
) -> None:
    client = client_for(alice)
    client.post(
        DICOM + "rules/", {"calling_ae": "CT1", "modality": "ct", "recipient_facility": gfc.pk}
    )
    rule = RoutingRule.objects.get()
    added = _event(AuditAction.ROUTING_RULE_ADD)
    assert added.detail["after"]["modality"] == "CT"
    assert added.detail["after"]["recipient_facility"] == "gfc"

    client.post(f"{DICOM}rules/{rule.uuid}/delete/")
    removed = _event(AuditAction.ROUTING_RULE_REMOVE)
    assert removed.detail["before"] == added.detail["after"]
    assert removed.facility == krmc

    # The facility's admin reads every one of these on the audit log page.
    log = client.get("/facilities/krmc/audit/").content.decode()
    assert "Added a routing rule" in log and "Removed a routing rule" in log


@pytest.mark.django_db
def test_the_admin_edits_a_destination_and_the_change_is_audited(
    alice: User, krmc: Facility
) -> None:
    destination = PacsDestination.objects.create(
        facility=krmc,
        name="Main PACS",
        ae_title="OLDPACS",
        host="127.0.0.1",
        port=104,
        last_echo_ok=True,
        last_echo_message="C-ECHO succeeded",
    )
    client = client_for(alice)
    url = f"{DICOM}destinations/{destination.uuid}/edit/"
    page = client.get(url)
    assert page.status_code == 200
    assert 'value="OLDPACS"' in page.content.decode()

    saved = client.post(
        url, {"name": "Main PACS", "ae_title": "NEWPACS", "host": "127.0.0.1", "port": 11112}
    )

    assert saved.status_code == 302
    destination.refresh_from_db()
    assert (destination.ae_title, destination.port) == ("NEWPACS", 11112)
    # The last test was of the old address: it no longer says the PACS answers.
    assert (destination.last_echo_ok, destination.last_echo_message) == (False, "")
    event = _event(AuditAction.DESTINATION_CHANGE)
    assert (event.actor, event.facility) == (alice, krmc)
    assert (event.detail["before"]["ae_title"], event.detail["before"]["port"]) == ("OLDPACS", 104)
    assert (event.detail["after"]["ae_title"], event.detail["after"]["port"]) == ("NEWPACS", 11112)
    # The same values again: nothing changes, nothing is written.
    client.post(
        url, {"name": "Main PACS", "ae_title": "NEWPACS", "host": "127.0.0.1", "port": 11112}
    )
    assert AuditEvent.objects.filter(action=AuditAction.DESTINATION_CHANGE).count() == 1


@pytest.mark.django_db
def test_an_edit_to_a_refused_address_or_a_bad_value_changes_nothing(
    alice: User, krmc: Facility
) -> None:
    destination = PacsDestination.objects.create(
        facility=krmc, name="PACS", ae_title="PACS", host="127.0.0.1", port=104
    )
    client = client_for(alice)
    url = f"{DICOM}destinations/{destination.uuid}/edit/"

    metadata = client.post(
        url, {"name": "PACS", "ae_title": "PACS", "host": "169.254.169.254", "port": 80}
    )
    bad_ca = client.post(
        url,
        {
            "name": "PACS",
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": 104,
            "tls": "on",
            "tls_ca_certificates": "not a certificate",
        },
    )

    assert metadata.status_code == bad_ca.status_code == 200
    assert "Relay will not connect there" in metadata.content.decode()
    assert "PEM form" in bad_ca.content.decode()
    destination.refresh_from_db()
    assert (destination.host, destination.port, destination.tls) == ("127.0.0.1", 104, False)
    refused = _event(AuditAction.DESTINATION_CHANGE)
    assert refused.outcome == "failure"
    assert refused.detail["host"] == "169.254.169.254"


@pytest.mark.django_db
def test_a_refused_form_changes_nothing_and_writes_nothing(alice: User, krmc: Facility) -> None:
    refused = client_for(alice).post(
        DICOM + "destinations/", {"name": "PACS", "ae_title": "BAD\\AE", "host": "x", "port": 0}
    )
    assert refused.status_code == 200
    assert not PacsDestination.objects.exists()
    assert not AuditEvent.objects.filter(action=AuditAction.DESTINATION_ADD).exists()


@pytest.mark.django_db
def test_the_page_takes_no_post_of_its_own(alice: User) -> None:
    # One URL per change: the page itself only shows.
    assert client_for(alice).post(DICOM, {"form": "gateway"}).status_code == 405


@pytest.mark.django_db
@pytest.mark.parametrize("persona", ["bob", "carol", "charlie"])
def test_nobody_but_the_facility_admin_changes_anything(
    request: Any, persona: str, alice: User, krmc: Facility, gfc: Facility
) -> None:
    destination = PacsDestination.objects.create(
        facility=krmc, name="PACS", ae_title="PACS", host="127.0.0.1", port=104
    )
    rule = RoutingRule.objects.create(facility=krmc, created_by=alice, recipient_facility=gfc)
    client = client_for(request.getfixturevalue(persona))
    attempts = [
        (DICOM + "gateway/", {"gateway_calling_aes": "EVIL"}),
        (DICOM + "destinations/", {"name": "X", "ae_title": "X", "host": "x", "port": 1}),
        (f"{DICOM}destinations/{destination.uuid}/echo/", {}),
        (
            f"{DICOM}destinations/{destination.uuid}/edit/",
            {"name": "X", "ae_title": "X", "host": "127.0.0.1", "port": 1},
        ),
        (f"{DICOM}destinations/{destination.uuid}/delete/", {}),
        (DICOM + "rules/", {"recipient_facility": gfc.pk}),
        (f"{DICOM}rules/{rule.uuid}/delete/", {}),
    ]
    for url, data in attempts:
        assert client.post(url, data).status_code == 404, url
    krmc.refresh_from_db()
    assert krmc.gateway_calling_aes == ""
    assert list(PacsDestination.objects.all()) == [destination]
    assert list(RoutingRule.objects.all()) == [rule]
    assert not AuditEvent.objects.filter(action__in=_config_actions()).exists()


def _config_actions() -> list[str]:
    return [
        AuditAction.GATEWAY_CHANGE,
        AuditAction.DESTINATION_ADD,
        AuditAction.DESTINATION_REMOVE,
        AuditAction.DESTINATION_CHANGE,
        AuditAction.DESTINATION_ECHO,
        AuditAction.ROUTING_RULE_ADD,
        AuditAction.ROUTING_RULE_REMOVE,
    ]
