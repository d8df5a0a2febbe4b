"""Refused DICOM associations are in the audit trail, not only in the server's log: dcmtk's
echoscu and storescu knock on the gateway the way a misconfigured or unknown PACS would."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, dicom_bytes, gateway_allow, require_peer
from tests.transfers.dicom.test_gateway import _free_port
from transfers.dicom.gateway import Gateway
from transfers.models import Instance

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]


@dataclass(frozen=True)
class Listening:
    gateway: Gateway
    port: int


@pytest.fixture
def gateway(krmc: Facility) -> Iterator[Listening]:
    gateway_allow(krmc, "PACS1 ECHOSCU PYNETDICOM")
    listening = Listening(Gateway(ae_title="RELAY"), _free_port())
    server = listening.gateway.start(host="127.0.0.1", port=listening.port)
    try:
        yield listening
    finally:
        server.shutdown()


def _echo(gateway: Listening, *, called: str, calling: str = "ECHOSCU") -> str:
    echoscu = require_peer("echoscu")
    result = subprocess.run(
        [echoscu, "-aet", calling, "-aec", called, "127.0.0.1", str(gateway.port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, "the association should have been refused"
    return result.stdout + result.stderr


def _refusals() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=AuditAction.DICOM_REFUSED).order_by("id"))


def test_an_unknown_called_title_is_audited(gateway: Listening) -> None:
    output = _echo(gateway, called="NOBODY", calling="STRANGER")
    assert "Called AE Title Not Recognized" in output

    [event] = _refusals()
    assert (event.outcome, event.facility, event.actor) == ("failure", None, None)
    assert event.client_ip == "127.0.0.1"
    assert event.detail["calling_ae"] == "STRANGER"
    assert event.detail["called_ae"] == "NOBODY"
    assert event.detail["address"] == "127.0.0.1"
    assert "no facility has the AE title 'NOBODY'" in event.detail["reason"]


def test_a_calling_title_not_allowed_is_audited_to_the_called_facility(
    gateway: Listening, krmc: Facility, alice: User, tmp_path: Path
) -> None:
    Facility.objects.filter(pk=krmc.pk).update(gateway_calling_aes="PACS1")
    file = tmp_path / "x.dcm"
    file.write_bytes(dicom_bytes("CT_small.dcm"))
    storescu = require_peer("storescu")
    result = subprocess.run(
        [storescu, "-aet", "INTRUDER", "-aec", "KRMC", "127.0.0.1", str(gateway.port), str(file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert not Instance.objects.exists()

    [event] = _refusals()
    assert event.facility == krmc
    assert (event.detail["calling_ae"], event.detail["called_ae"]) == ("INTRUDER", "KRMC")
    assert "calling AE 'INTRUDER' is not allowed" in event.detail["reason"]
    # Kalispell's admin reads it on the facility's log.
    page = client_for(alice).get("/facilities/krmc/audit/", {"action": "dicom_refused"})
    assert "INTRUDER" in page.content.decode()


def test_an_address_not_allowed_is_audited(gateway: Listening, krmc: Facility) -> None:
    Facility.objects.filter(pk=krmc.pk).update(gateway_addresses="10.0.0.0/8")
    _echo(gateway, called="KRMC")
    [event] = _refusals()
    assert event.facility == krmc
    assert event.detail["reason"] == "address 127.0.0.1 is not allowed for krmc"


def test_a_refusal_for_too_many_associations_is_audited(gateway: Listening, krmc: Facility) -> None:
    gateway.gateway.ae.maximum_associations = 1
    # One PACS holds the only association open; the next one is one too many.
    holder = AE(ae_title="PACS1")
    holder.add_requested_context("1.2.840.10008.1.1")
    assoc = holder.associate("127.0.0.1", gateway.port, ae_title="KRMC")
    assert assoc.is_established
    try:
        output = _echo(gateway, called="KRMC", calling="PACS2")
    finally:
        assoc.release()
    assert "Local Limit Exceeded" in output, output
    [event] = _refusals()
    assert (event.facility, event.detail["calling_ae"]) == (krmc, "PACS2")
    assert event.detail["reason"] == "too many associations at once"


def test_an_admitted_association_is_not_a_refusal(gateway: Listening) -> None:
    echoscu = require_peer("echoscu")
    result = subprocess.run(
        [echoscu, "-aec", "KRMC", "127.0.0.1", str(gateway.port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert _refusals() == []
