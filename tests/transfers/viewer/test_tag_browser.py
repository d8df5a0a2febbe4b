"""The viewer's tag browser endpoint (transfers.viewer.views `_tags`) and its geometry.json (for
synchronized scrolling, reference lines and the cine rate): who gets them, what the header holds
(no pixel data, long and binary values cut), that it is audited, and what the geometry says."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from tests.transfers.viewer.test_viewer_views import IN, PERSONAS, STUDY_UID, World
from transfers.models import Instance

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(client: Client, bob: User, bob_token: str, carol: User, gfc: Facility) -> World:
    return World(client, bob, bob_token, carol, gfc)


def _tags_url(page_url: str, sop: str) -> str:
    return f"{page_url}tags/{sop}/"


def _by_keyword(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["keyword"]: row for row in rows if not row["tag"].startswith(">")}


@pytest.mark.parametrize("persona", list(PERSONAS))
def test_access(world: World, persona: str) -> None:
    client, urls = world.client_and_urls(persona)
    response = client.get(_tags_url(urls["page"], world.instances[1].sop_instance_uid))
    if PERSONAS[persona] == IN:
        assert response.status_code == 200
        tags = _by_keyword(response.json()["tags"])
        assert tags["PatientName"]["value"] == "SECRET^PATIENT"
        return
    assert response.status_code == 404
    assert b"SECRET" not in response.content


def test_it_lists_the_header_without_the_pixels(world: World) -> None:
    page = world.urls()["page"]
    response = client_for(world.bob).get(_tags_url(page, world.instances[2].sop_instance_uid))
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    rows = response.json()["tags"]
    tags = _by_keyword(rows)
    assert tags["PixelSpacing"] == {
        "tag": "(0028,0030)",
        "keyword": "PixelSpacing",
        "vr": "DS",
        "value": "0.661468\\0.661468",
    }
    assert tags["InstanceNumber"]["value"] == "2"
    assert tags["TransferSyntaxUID"]["tag"] == "(0002,0010)"  # the file meta too
    assert not any(row["tag"].startswith("(7FE0") for row in rows)
    assert "PixelData" not in tags


def test_long_and_binary_values_are_cut(world: World, client: Client, bob_token: str) -> None:
    data = dicom_bytes(
        "CT_small.dcm",
        StudyInstanceUID=STUDY_UID,
        ImageComments="x" * 5000,
        EncapsulatedDocument=b"%PDF" * 1000,
    )
    response = upload(client, data, token=bob_token)
    assert response.status_code == 201, response.content
    sop = response.json()["sop_instance_uid"]
    rows = client_for(world.bob).get(_tags_url(world.urls()["page"], sop)).json()["tags"]
    tags = _by_keyword(rows)
    assert tags["ImageComments"]["value"] == "x" * 200 + "… (5000 characters)"
    assert tags["EncapsulatedDocument"]["value"] == "(binary, 4000 bytes)"


def test_it_is_audited_with_the_image_it_showed(world: World) -> None:
    sop = world.instances[1].sop_instance_uid
    client = client_for(world.dana)
    assert client.get(_tags_url(world.urls()["page"], sop)).status_code == 200
    (event,) = [
        e
        for e in AuditEvent.objects.filter(action=AuditAction.STUDY_VIEW)
        if e.detail.get("via") == "tags"
    ]
    assert event.actor == world.dana
    assert event.study_instance_uid == STUDY_UID
    assert event.detail == {"via": "tags", "sop": sop, "share": str(world.share.uuid)}


def test_an_image_of_another_study_is_404(world: World, client: Client, bob_token: str) -> None:
    response = upload(
        client, dicom_bytes("CT_small.dcm", StudyInstanceUID="1.2.3.4.5.6"), token=bob_token
    )
    other = response.json()["sop_instance_uid"]
    response = client_for(world.bob).get(_tags_url(world.urls()["page"], other))
    assert response.status_code == 404
    assert not AuditEvent.objects.filter(action=AuditAction.STUDY_VIEW).exists()


def test_the_patient_door_answers_a_verified_patient(world: World) -> None:
    client, token = world.patient("verified")
    urls = world.urls(token)
    response = client.get(_tags_url(urls["page"], world.instances[3].sop_instance_uid))
    assert response.status_code == 200
    assert _by_keyword(response.json()["tags"])["InstanceNumber"]["value"] == "3"


# --- geometry.json -----------------------------------------------------------------------------


def _geometry_url(page_url: str) -> str:
    return page_url + "geometry.json"


@pytest.mark.parametrize("persona", list(PERSONAS))
def test_geometry_access(world: World, persona: str) -> None:
    client, urls = world.client_and_urls(persona)
    response = client.get(_geometry_url(urls["page"]))
    if PERSONAS[persona] == IN:
        assert response.status_code == 200
        assert len(response.json()["series"][0]["instances"]) == 3
        return
    assert response.status_code == 404
    assert b"series" not in response.content


def _series(world: World) -> dict[str, Any]:
    data = client_for(world.bob).get(_geometry_url(world.urls()["page"])).json()
    (series,) = data["series"]
    return dict(series)


def test_geometry_says_where_each_image_lies(world: World) -> None:
    study_json = client_for(world.bob).get(world.urls()["json"]).json()
    assert study_json["geometry_url"] == world.urls()["page"] + "geometry.json"
    series = _series(world)
    assert series["uid"] == world.series.series_instance_uid
    assert series["frame_of_reference"]  # CT_small's Frame of Reference UID
    assert series["fps"] is None
    geometry = series["instances"]
    assert len(geometry) == 3  # one each, in study.json's order of the instances
    first = geometry[0]
    assert first["rows"] == first["columns"] == 128
    assert first["iop"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert first["ps"] == [0.661468, 0.661468]
    assert len(first["ipp"]) == 3


def test_geometry_gives_the_cine_rate_from_the_frame_time(
    world: World, client: Client, bob_token: str
) -> None:
    Instance.objects.all().delete()
    response = upload(
        client,
        dicom_bytes("CT_small.dcm", StudyInstanceUID=STUDY_UID, FrameTime=40),
        token=bob_token,
    )
    assert response.status_code == 201
    assert _series(world)["fps"] == 25
    response = upload(
        client,
        dicom_bytes(
            "CT_small.dcm",
            StudyInstanceUID=STUDY_UID,
            SeriesInstanceUID="1.2.826.0.1.3680043.8.498.4077",
            RecommendedDisplayFrameRate=12,
            FrameTime=40,
        ),
        token=bob_token,
    )
    assert response.status_code == 201
    data = client_for(world.bob).get(_geometry_url(world.urls()["page"])).json()
    rates = {s["uid"]: s["fps"] for s in data["series"]}
    assert rates["1.2.826.0.1.3680043.8.498.4077"] == 12
