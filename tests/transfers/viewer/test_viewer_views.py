"""The viewer's page and data endpoints (transfers.viewer.views): who gets in, what is audited,
what a frame carries, and which links the study pages show."""

from __future__ import annotations

import gzip
import json
from datetime import timedelta
from typing import Any

import numpy as np
import pydicom
import pytest
from django.test import Client
from django.utils import timezone
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from portal.models import AuditAction, AuditEvent, Facility, Membership, User
from tests.helpers import PASSWORD, client_for, dicom_bytes, upload
from transfers.models import (
    Instance,
    Series,
    Share,
    ShareEvent,
    ShareEventKind,
    ShareKind,
    Study,
    StudyStatus,
)
from transfers.reports import report_attach
from transfers.sharing.services import share_create, share_revoke

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"
PATIENT_NAME = "SECRET^PATIENT"
STUDY_UID = "1.2.826.0.1.3680043.8.498.4001"
OTHER_STUDY_UID = "1.2.826.0.1.3680043.8.498.4002"
IN = "in"
LOGIN = "login"
FACTOR = "factor"

PERSONAS: dict[str, str | int] = {
    "uploader": IN,
    "colleague": IN,
    "recipient_reader": IN,
    "patient_verified": IN,
    "unrelated_reader": 404,
    "reader_expired_share": 404,
    "reader_revoked_share": 404,
    "patient_not_verified": FACTOR,
    "patient_wrong_factor": FACTOR,
    "patient_expired_link": 404,
    "patient_revoked_link": 404,
    "anonymous": LOGIN,
}
RESOURCES = ["page", "json", "frame", "thumbnail"]


def _user(email: str, facility: Facility, role: str = "reader") -> User:
    user = User.objects.create_user(email=email, password=PASSWORD)
    Membership.objects.create(user=user, facility=facility, role=role)
    return user


def _store(client: Client, token: str, **changes: Any) -> Instance:
    changes.setdefault("StudyInstanceUID", STUDY_UID)
    changes.setdefault("PatientName", PATIENT_NAME)
    changes.setdefault("PatientBirthDate", BIRTH_DATE.replace("-", ""))
    response = upload(client, dicom_bytes("CT_small.dcm", **changes), token=token)
    assert response.status_code == 201, response.content
    return Instance.objects.get(sop_instance_uid=response.json()["sop_instance_uid"])


class World:
    """Kalispell's CT study (three slices, a report), shared with Great Falls (dana reads there),
    with two facilities whose shares lapsed, and by patient links in every state."""

    def __init__(
        self, client: Client, bob: User, bob_token: str, carol: User, gfc: Facility
    ) -> None:
        # Uploaded out of order: the viewer orders by Instance Number.
        self.instances = {
            n: _store(client, bob_token, InstanceNumber=n, SliceLocation=float(n))
            for n in (3, 1, 2)
        }
        Study.objects.update(status=StudyStatus.COMPLETE)
        self.study = Study.objects.get()
        self.series = Series.objects.get(study=self.study)
        self.report = report_attach(
            study=self.study, by=bob, text="No acute findings.", for_patient=True
        )
        self.bob, self.carol = bob, carol
        self.share, _ = share_create(
            facility=self.study.facility,
            created_by=bob,
            studies=[self.study],
            kind="facility",
            recipient_facility=gfc,
            can_download=False,
        )
        self.dana = _user("dana@gfc.example", gfc)
        self.erin = _user(
            "erin@stluke.example", Facility.objects.create(name="St. Luke", slug="stluke")
        )
        havre = Facility.objects.create(name="Havre Clinic", slug="havre")
        billings = Facility.objects.create(name="Billings Imaging", slug="billings")
        self.frank = _user("frank@havre.example", havre)
        self.gina = _user("gina@billings.example", billings)
        expired, _ = share_create(
            facility=self.study.facility,
            created_by=bob,
            studies=[self.study],
            kind="facility",
            recipient_facility=havre,
        )
        Share.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))
        revoked, _ = share_create(
            facility=self.study.facility,
            created_by=bob,
            studies=[self.study],
            kind="facility",
            recipient_facility=billings,
        )
        share_revoke(share=revoked, by=bob)
        self.links: dict[str, tuple[Share, str]] = {}
        for name in ("verified", "unverified", "wrong", "expired", "revoked"):
            share, token = share_create(
                facility=self.study.facility,
                created_by=bob,
                studies=[self.study],
                kind="patient",
                second_factor="birth_date",
                can_download=True,
            )
            assert token is not None
            self.links[name] = (share, token)

    def urls(self, token: str | None = None) -> dict[str, str]:
        base = (
            f"/studies/{self.study.uuid}/view/"
            if token is None
            else f"/p/{token}/studies/{self.study.uuid}/view/"
        )
        return {
            "page": base,
            "json": base + "study.json",
            "frame": f"{base}frames/{self.instances[1].sop_instance_uid}/0/",
            "thumbnail": f"{base}thumbs/{self.series.series_instance_uid}/",
        }

    def patient(self, link: str) -> tuple[Client, str]:
        share, token = self.links[link]
        client = Client()
        if link != "unverified":
            answer = "1999-01-01" if link == "wrong" else BIRTH_DATE
            client.post(f"/p/{token}/", {"birth_date": answer})
        if link == "expired":
            Share.objects.filter(pk=share.pk).update(expires_at=timezone.now() - timedelta(1))
        if link == "revoked":
            share_revoke(share=share, by=self.bob)
        return client, token

    def client_and_urls(self, persona: str) -> tuple[Client, dict[str, str]]:
        by_user = {
            "uploader": self.bob,
            "colleague": self.carol,
            "recipient_reader": self.dana,
            "unrelated_reader": self.erin,
            "reader_expired_share": self.frank,
            "reader_revoked_share": self.gina,
        }
        if persona in by_user:
            return client_for(by_user[persona]), self.urls()
        if persona == "anonymous":
            return Client(), self.urls()
        link = {
            "patient_verified": "verified",
            "patient_not_verified": "unverified",
            "patient_wrong_factor": "wrong",
            "patient_expired_link": "expired",
            "patient_revoked_link": "revoked",
        }[persona]
        client, token = self.patient(link)
        return client, self.urls(token)


@pytest.fixture
def world(client: Client, bob: User, bob_token: str, carol: User, gfc: Facility) -> World:
    return World(client, bob, bob_token, carol, gfc)


def _meta(response: Any) -> dict[str, Any]:
    return json.loads(response["X-Relay-Frame"])


# --- who gets in --------------------------------------------------------------------------------


@pytest.mark.parametrize("resource", RESOURCES)
@pytest.mark.parametrize("persona", list(PERSONAS))
def test_access(world: World, persona: str, resource: str) -> None:
    client, urls = world.client_and_urls(persona)
    response = client.get(urls[resource])
    body = bytes(response.content)
    expected = PERSONAS[persona]

    if expected == IN:
        assert response.status_code == 200
        if resource == "page":
            assert b"SECRET, PATIENT" in body
        elif resource == "json":
            assert response.json()["study"]["patient_name"] == "SECRET, PATIENT"
        elif resource == "frame":
            assert _meta(response)["rows"] == 128
            assert len(gzip.decompress(body)) == 128 * 128 * 2
        else:
            assert body.startswith(b"\x89PNG")
        return

    if expected == LOGIN and resource == "page":
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
    elif expected == FACTOR and resource == "page":
        # Back to the second factor, as the patient's list of studies does.
        assert response.status_code == 302
        assert response["Location"] == f"/p/{urls['page'].split('/')[2]}/"
    else:
        assert response.status_code == 404
    assert b"SECRET" not in body
    assert not body.startswith(b"\x1f\x8b")  # no gzip of pixel values
    assert not body.startswith(b"\x89PNG")
    assert "X-Relay-Frame" not in response


def test_a_share_that_allows_download_only_does_not_open_the_viewer(world: World) -> None:
    Share.objects.filter(pk=world.share.pk).update(can_view=False, can_download=True)
    client = client_for(world.dana)
    for url in world.urls().values():
        assert client.get(url).status_code == 404


def test_another_share_that_allows_viewing_still_opens_it(world: World, gfc: Facility) -> None:
    Share.objects.filter(pk=world.share.pk).update(can_view=False, can_download=True)
    share_create(
        facility=world.study.facility,
        created_by=world.bob,
        studies=[world.study],
        kind="facility",
        recipient_facility=gfc,
    )
    response = client_for(world.dana).get(world.urls()["page"])
    assert response.status_code == 200
    # The download-only share still lets dana download.
    assert f'href="/studies/{world.study.uuid}/download/"'.encode() in response.content


# --- what one view leaves behind ----------------------------------------------------------------


def _viewer_audits() -> list[AuditEvent]:
    return [
        e
        for e in AuditEvent.objects.filter(action=AuditAction.STUDY_VIEW)
        if e.detail.get("via") == "viewer"
    ]


def test_it_audits_each_page_load_once_and_not_each_frame(world: World) -> None:
    client = client_for(world.carol)
    urls = world.urls()
    assert client.get(urls["page"]).status_code == 200
    assert client.get(urls["json"]).status_code == 200
    for instance in world.instances.values():
        assert (
            client.get(urls["page"] + f"frames/{instance.sop_instance_uid}/0/").status_code == 200
        )
    assert client.get(urls["thumbnail"]).status_code == 200

    (event,) = _viewer_audits()
    assert event.actor == world.carol
    assert event.study_instance_uid == STUDY_UID
    assert event.detail == {"via": "viewer", "share": None}

    assert client.get(urls["page"]).status_code == 200
    assert len(_viewer_audits()) == 2


def test_the_recipients_first_open_is_the_senders_opened_receipt(world: World) -> None:
    client = client_for(world.dana)
    assert client.get(world.urls()["page"]).status_code == 200
    assert client.get(world.urls()["page"]).status_code == 200

    opened = ShareEvent.objects.filter(share=world.share, kind=ShareEventKind.OPENED)
    assert [e.actor_label for e in opened] == [world.dana.email]
    world.share.refresh_from_db()
    assert world.share.first_opened_by == world.dana.email
    events = _viewer_audits()
    assert len(events) == 2
    assert events[0].detail == {"via": "viewer", "share": str(world.share.uuid)}


def test_the_uploader_opening_the_viewer_is_no_receipt(world: World) -> None:
    assert client_for(world.bob).get(world.urls()["page"]).status_code == 200
    assert not ShareEvent.objects.filter(kind=ShareEventKind.OPENED).exists()


def test_a_patient_view_is_audited_without_a_second_receipt(world: World) -> None:
    client, token = world.patient("verified")
    share = world.links["verified"][0]
    assert client.get(world.urls(token)["page"]).status_code == 200
    # The receipt came with the second factor; the viewer adds none.
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.OPENED).count() == 1
    (event,) = _viewer_audits()
    assert event.actor is None
    assert event.detail == {"via": "viewer", "share": str(share.uuid)}


# --- UIDs belong to the study -------------------------------------------------------------------


def test_an_image_or_series_of_another_study_is_404(
    world: World, client: Client, bob_token: str
) -> None:
    other = _store(
        client,
        bob_token,
        StudyInstanceUID=OTHER_STUDY_UID,
        SeriesInstanceUID=OTHER_STUDY_UID + ".1",
        InstanceNumber=1,
    )
    bob = client_for(world.bob)
    base = world.urls()["page"]
    # Bob may see both studies, but not one's image through the other's address.
    assert bob.get(f"{base}frames/{other.sop_instance_uid}/0/").status_code == 404
    assert bob.get(f"{base}thumbs/{other.series.series_instance_uid}/").status_code == 404
    other_base = f"/studies/{other.series.study.uuid}/view/"
    assert bob.get(f"{other_base}frames/{other.sop_instance_uid}/0/").status_code == 200

    dana = client_for(world.dana)  # the share covers the first study only
    assert dana.get(f"{base}frames/{other.sop_instance_uid}/0/").status_code == 404
    assert dana.get(f"{other_base}frames/{other.sop_instance_uid}/0/").status_code == 404


def test_a_frame_out_of_range_or_an_unknown_uid_is_404(world: World) -> None:
    bob = client_for(world.bob)
    base = world.urls()["page"]
    assert bob.get(f"{base}frames/{world.instances[1].sop_instance_uid}/1/").status_code == 404
    assert bob.get(f"{base}frames/1.2.3.4/0/").status_code == 404
    assert bob.get(f"{base}thumbs/1.2.3.4/").status_code == 404


# --- what is sent -------------------------------------------------------------------------------


def test_a_frame_carries_the_modality_values_and_their_meta(world: World) -> None:
    response = client_for(world.carol).get(world.urls()["frame"])
    assert response.status_code == 200
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Encoding"] == "gzip"
    # PHI: no browser or proxy keeps a copy (the viewer holds frames in memory while open).
    assert response["Cache-Control"] == "no-store"
    assert "Cookie" in response["Vary"]
    assert response["X-Relay-Frame"].isascii()

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)
    meta = _meta(response)
    values = np.frombuffer(gzip.decompress(response.content), dtype=np.dtype(meta["dtype"]))
    assert np.array_equal(values.reshape(meta["rows"], meta["columns"]), hu)
    assert meta["kind"] == "gray"
    assert meta["min_value"] == float(hu.min())
    assert meta["max_value"] == float(hu.max())
    assert meta["units"] == "HU"
    assert meta["modality"] == "CT"
    assert meta["pixel_spacing"] == [float(v) for v in ds.PixelSpacing]
    assert meta["spacing_kind"] == "PixelSpacing"
    assert meta["instance_number"] == 1
    assert meta["slice_location"] == 1.0
    assert meta["error"] is None


def test_a_frame_that_cannot_be_decoded_says_why(
    world: World, client: Client, bob_token: str
) -> None:
    from pydicom.encaps import encapsulate

    garbage = b"\xff\x4f\xff\x51" + bytes(range(256)) * 8
    response = upload(
        client,
        dicom_bytes(
            "MR_small_jp2klossless.dcm",
            StudyInstanceUID=STUDY_UID,
            PatientName=PATIENT_NAME,
            PatientBirthDate=BIRTH_DATE.replace("-", ""),
            PixelData=encapsulate([garbage]),
        ),
        token=bob_token,
    )
    assert response.status_code == 201, response.content
    sop = response.json()["sop_instance_uid"]
    frame = client_for(world.bob).get(world.urls()["page"] + f"frames/{sop}/0/")
    assert frame.status_code == 200
    assert _meta(frame)["error"]
    assert gzip.decompress(frame.content) == b""


def test_study_json_lists_every_stack_in_instance_order(world: World) -> None:
    data = client_for(world.bob).get(world.urls()["json"]).json()
    base = world.urls()["page"]
    assert data["study"] == {
        "patient_name": "SECRET, PATIENT",
        "patient_id": world.study.patient_id,
        "patient_birth_date": BIRTH_DATE,
        "patient_sex": world.study.patient_sex,
        "study_date": world.study.study_date.isoformat() if world.study.study_date else "",
        "study_time": world.study.study_time.strftime("%H:%M") if world.study.study_time else "",
        "description": world.study.description,
        "accession_number": world.study.accession_number,
        "modalities": ["CT"],
    }
    assert data["frame_url"] == base + "frames/{sop}/{frame}/"
    (series,) = data["series"]
    assert series["uid"] == world.series.series_instance_uid
    assert series["modality"] == "CT"
    assert series["thumbnail_url"] == f"{base}thumbs/{world.series.series_instance_uid}/"
    assert series["instances"] == [
        {"uid": world.instances[n].sop_instance_uid, "number": n, "frames": 1} for n in (1, 2, 3)
    ]


def test_the_patient_page_hands_its_script_the_patient_urls(world: World) -> None:
    client, token = world.patient("verified")
    response = client.get(world.urls(token)["page"])
    html = response.content.decode()
    base = f"/p/{token}/studies/{world.study.uuid}/view/"
    assert f'data-study-url="{base}study.json"' in html
    assert f'href="/p/{token}/studies/{world.study.uuid}/download/"' in html
    assert f"/p/{token}/studies/{world.study.uuid}/reports/{world.report.uuid}/" in html
    assert "No acute findings." in html
    assert 'name="referrer" content="no-referrer"' in html
    assert client.get(base + "study.json").json()["frame_url"] == base + "frames/{sop}/{frame}/"


# --- the download button ------------------------------------------------------------------------


@pytest.mark.parametrize("can_download", [False, True])
def test_the_download_button_is_there_only_when_the_share_allows_it(
    world: World, can_download: bool
) -> None:
    Share.objects.filter(pk=world.share.pk).update(can_download=can_download)
    html = client_for(world.dana).get(world.urls()["page"]).content.decode()
    assert ('id="download"' in html) is can_download
    assert (f'href="/studies/{world.study.uuid}/download/"' in html) is can_download


def test_the_facility_that_holds_the_study_may_always_download(world: World) -> None:
    html = client_for(world.carol).get(world.urls()["page"]).content.decode()
    assert f'id="download" href="/studies/{world.study.uuid}/download/"' in html


def test_a_patient_link_without_download_has_no_button(world: World) -> None:
    client, token = world.patient("verified")
    Share.objects.filter(pk=world.links["verified"][0].pk).update(can_download=False)
    html = client.get(world.urls(token)["page"]).content.decode()
    assert 'id="download"' not in html


# --- links to the viewer ------------------------------------------------------------------------


def test_the_study_page_links_to_the_viewer(world: World) -> None:
    html = client_for(world.dana).get(f"/studies/{world.study.uuid}/").content.decode()
    assert f'href="/studies/{world.study.uuid}/view/"' in html


def test_the_inbox_links_to_the_viewer_and_to_the_download_when_allowed(world: World) -> None:
    client = client_for(world.dana)
    html = client.get("/inbox/").content.decode()
    assert f'href="/studies/{world.study.uuid}/view/"' in html
    assert f'href="/studies/{world.study.uuid}/download/"' not in html
    Share.objects.filter(pk=world.share.pk).update(can_download=True)
    html = client.get("/inbox/").content.decode()
    assert f'href="/studies/{world.study.uuid}/download/"' in html


def test_the_patients_list_links_to_the_viewer_and_the_download(world: World) -> None:
    client, token = world.patient("verified")
    html = client.get(f"/p/{token}/studies/").content.decode()
    assert f'href="/p/{token}/studies/{world.study.uuid}/view/"' in html
    assert f'href="/p/{token}/studies/{world.study.uuid}/download/"' in html
    assert world.links["verified"][0].kind == ShareKind.PATIENT
