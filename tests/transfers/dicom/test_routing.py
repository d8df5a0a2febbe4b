"""Routing rules: a study from a facility's PACS is shared automatically once complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.test import Client

from portal.models import Facility, Membership, User
from tests.helpers import client_for, dicom_bytes, gateway_allow, upload
from tests.transfers.dicom.test_gateway import _storescu, gateway  # noqa: F401  (fixture)
from transfers.models import RoutedStudy, RoutingRule, Share, ShareKind, Study, StudyStatus
from transfers.tasks import studies_complete_quiet


def _rule(facility: Facility, by: User, **fields: Any) -> RoutingRule:
    return RoutingRule.objects.create(facility=facility, created_by=by, **fields)


def _quiet(settings: Any) -> None:
    settings.RELAY_STUDY_QUIET_SECONDS = 0
    studies_complete_quiet()


@pytest.mark.django_db(transaction=True)
@pytest.mark.peer
def test_a_study_from_the_pacs_is_shared_by_the_rule_once_complete(
    gateway: int,  # noqa: F811
    tmp_path: Path,
    alice: User,
    gfc: Facility,
    settings: Any,
) -> None:
    krmc = alice.memberships.get().facility
    gateway_allow(krmc, "KRMCPACS")
    _rule(krmc, alice, calling_ae="KRMCPACS", recipient_facility=gfc, can_import=True)
    files = []
    for n in range(3):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(
            dicom_bytes("CT_small.dcm", StudyInstanceUID="1.2.826.0.1.3680043.8.498.7")
        )
        files.append(path)
    assert _storescu(gateway, files, calling="KRMCPACS").returncode == 0
    study = Study.objects.get()
    assert study.received_from_ae == "KRMCPACS"
    # Still arriving: nobody is told yet.
    assert not Share.objects.exists()

    _quiet(settings)

    study.refresh_from_db()
    assert study.status == StudyStatus.COMPLETE
    share = Share.objects.get()
    assert share.kind == ShareKind.FACILITY
    assert share.recipient_facility == gfc
    assert list(share.studies.all()) == [study]
    assert share.can_import and share.can_download
    assert share.created_by == alice
    # Applied once: a second pass of the beat task shares nothing more.
    _quiet(settings)
    assert Share.objects.count() == 1
    assert RoutedStudy.objects.get().share == share
    assert pydicom.dcmread(files[0]).StudyInstanceUID == study.study_instance_uid


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        ({"calling_ae": "CT1"}, True),
        ({"calling_ae": "CT2"}, False),
        ({"modality": "ct"}, True),
        ({"modality": "MR"}, False),
        ({"referring_physician": "welby"}, True),
        ({"referring_physician": "house"}, False),
        ({}, True),
    ],
)
def test_rules_match_on_calling_title_modality_and_referring_physician(
    rule: dict[str, str], matches: bool, client: Client, bob_token: str, alice: User, gfc: Facility
) -> None:
    data = dicom_bytes("CT_small.dcm", ReferringPhysicianName="Welby^Marcus")
    assert upload(client, data, token=bob_token).status_code == 201
    study = Study.objects.get()
    Study.objects.filter(pk=study.pk).update(received_from_ae="CT1")
    study.refresh_from_db()
    made = _rule(study.facility, alice, recipient_facility=gfc, **rule)
    assert made.matches(study) is matches


@pytest.mark.django_db
def test_an_uploaded_study_is_not_routed(
    client: Client, bob_token: str, alice: User, gfc: Facility, settings: Any
) -> None:
    assert upload(client, dicom_bytes("CT_small.dcm"), token=bob_token).status_code == 201
    _rule(Study.objects.get().facility, alice, recipient_facility=gfc)
    _quiet(settings)
    assert not Share.objects.exists()


@pytest.mark.django_db
def test_a_rule_whose_author_left_records_why_it_did_not_share(
    client: Client, bob_token: str, alice: User, gfc: Facility, settings: Any
) -> None:
    assert upload(client, dicom_bytes("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(received_from_ae="CT1")
    _rule(Study.objects.get().facility, alice, recipient_facility=gfc)
    Membership.objects.filter(user=alice).delete()

    _quiet(settings)

    assert not Share.objects.exists()
    assert "Only senders and admins" in RoutedStudy.objects.get().error


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("persona", "status"), [("alice", 200), ("bob", 404), ("carol", 404), ("charlie", 404)]
)
def test_only_the_facility_admin_sees_the_dicom_page(
    request: Any, persona: str, status: int, krmc: Facility
) -> None:
    response = client_for(request.getfixturevalue(persona)).get("/facilities/krmc/dicom/")
    assert response.status_code == status


@pytest.mark.django_db
def test_the_admin_adds_and_removes_a_rule_and_sets_the_allow_lists(
    alice: User, gfc: Facility
) -> None:
    client = client_for(alice)
    refused = client.post("/facilities/krmc/dicom/rules/", {"modality": "CT"})  # no recipient
    assert "Choose one recipient" in refused.content.decode()
    assert not RoutingRule.objects.exists()

    added = client.post(
        "/facilities/krmc/dicom/rules/",
        {"calling_ae": "CT1", "modality": "ct", "recipient_facility": gfc.pk},
    )
    assert added.status_code == 302
    rule = RoutingRule.objects.get()
    assert (rule.calling_ae, rule.modality, rule.recipient_facility) == ("CT1", "CT", gfc)
    page = client.get("/facilities/krmc/dicom/").content.decode()
    assert "Great Falls Clinic" in page and "CT1" in page

    saved = client.post(
        "/facilities/krmc/dicom/gateway/",
        {"gateway_calling_aes": "CT1 CT2", "gateway_addresses": "10.0.0.0/8"},
    )
    assert saved.status_code == 302
    assert Facility.objects.get(slug="krmc").gateway_calling_aes == "CT1 CT2"

    assert client.post(f"/facilities/krmc/dicom/rules/{rule.uuid}/delete/").status_code == 302
    assert not RoutingRule.objects.exists()
    # Another facility's admin cannot remove it (it is not theirs): 404.
    other = _rule(gfc, alice, recipient_facility=gfc)
    assert client.post(f"/facilities/krmc/dicom/rules/{other.uuid}/delete/").status_code == 404
    assert RoutingRule.objects.filter(pk=other.pk).exists()
