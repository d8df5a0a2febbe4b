"""The Studies page: what it lists, how it searches, filters, sorts and pages."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from portal.models import Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Series, Study

pytestmark = pytest.mark.django_db


def make_study(facility: Facility, n: int, **fields: object) -> Study:
    defaults: dict[str, object] = {
        "study_instance_uid": f"1.2.826.0.1.{facility.pk}.{n}",
        "patient_name": f"PATIENT^NUMBER{n:03d}",
        "patient_id": f"MRN{n:05d}",
        "accession_number": f"ACC{n:05d}",
        "study_date": dt.date(2026, 1, 1) + dt.timedelta(days=n),
        "modalities": ",CT,",
        "num_series": 1,
        "num_instances": 10,
    }
    defaults.update(fields)
    study = Study.objects.create(facility=facility, **defaults)
    Series.objects.create(
        study=study, series_instance_uid=f"{study.study_instance_uid}.1", modality="CT"
    )
    return study


def rows(response) -> list[str]:
    return re.findall(r'<a href="/studies/[0-9a-f-]+/">([^<]*)</a>', response.content.decode())


def test_it_lists_the_studies_of_my_facilities_only(bob, krmc, gfc):
    make_study(krmc, 1, patient_name="OURS^ANNA")
    make_study(gfc, 2, patient_name="THEIRS^BEN")
    response = client_for(bob).get("/studies/")
    assert response.status_code == 200
    assert rows(response) == ["OURS, ANNA"]


def test_it_searches_by_patient_name_id_and_accession(bob, krmc):
    make_study(krmc, 1, patient_name="DOE^JANE", patient_id="X1", accession_number="A1")
    make_study(krmc, 2, patient_name="ROE^RICHARD", patient_id="X2", accession_number="A2")
    client = client_for(bob)
    assert rows(client.get("/studies/", {"q": "jane"})) == ["DOE, JANE"]
    assert rows(client.get("/studies/", {"q": "Doe, Jane"})) == ["DOE, JANE"]
    assert rows(client.get("/studies/", {"q": "x2"})) == ["ROE, RICHARD"]
    assert rows(client.get("/studies/", {"q": "A1"})) == ["DOE, JANE"]
    assert rows(client.get("/studies/", {"q": "nobody"})) == []


def test_it_filters_by_date_range_and_modality(bob, krmc):
    make_study(krmc, 1, patient_name="A^CT", study_date=dt.date(2026, 3, 1), modalities=",CT,")
    make_study(krmc, 2, patient_name="B^US", study_date=dt.date(2026, 3, 15), modalities=",US,")
    make_study(krmc, 3, patient_name="C^IVUS", study_date=dt.date(2026, 3, 20), modalities=",IVUS,")
    make_study(krmc, 4, patient_name="D^CTPT", study_date=dt.date(2026, 4, 2), modalities=",CT,PT,")
    client = client_for(bob)
    assert rows(client.get("/studies/", {"modality": "US"})) == ["B, US"]
    assert rows(client.get("/studies/", {"modality": "CT"})) == ["D, CTPT", "A, CT"]
    assert rows(client.get("/studies/", {"from": "2026-03-10", "to": "2026-03-31"})) == [
        "C, IVUS",
        "B, US",
    ]
    # A malformed date is ignored rather than an error.
    assert client.get("/studies/", {"from": "03/10/2026"}).status_code == 200


def test_it_sorts(bob, krmc):
    make_study(krmc, 1, patient_name="BRAVO", study_date=dt.date(2026, 1, 5))
    make_study(krmc, 2, patient_name="ALPHA", study_date=dt.date(2026, 1, 9))
    make_study(krmc, 3, patient_name="CHARLIE", study_date=dt.date(2026, 1, 1))
    client = client_for(bob)
    assert rows(client.get("/studies/")) == ["ALPHA", "BRAVO", "CHARLIE"]
    assert rows(client.get("/studies/", {"sort": "-date"})) == ["CHARLIE", "BRAVO", "ALPHA"]
    assert rows(client.get("/studies/", {"sort": "name"})) == ["ALPHA", "BRAVO", "CHARLIE"]
    assert rows(client.get("/studies/", {"sort": "-name"})) == ["CHARLIE", "BRAVO", "ALPHA"]
    assert rows(client.get("/studies/", {"sort": "nonsense"})) == ["ALPHA", "BRAVO", "CHARLIE"]


def test_it_pages_and_keeps_the_filters_on_page_links(bob, krmc):
    for n in range(30):
        make_study(krmc, n)
    client = client_for(bob)
    first = client.get("/studies/", {"modality": "CT"})
    assert len(rows(first)) == 25
    assert "modality=CT&amp;page=2" in first.content.decode()
    second = client.get("/studies/", {"modality": "CT", "page": 2})
    assert len(rows(second)) == 5
    assert not set(rows(first)) & set(rows(second))
    assert client.get("/studies/", {"page": "999"}).status_code == 200


def _queries_for(user: User) -> int:
    client = client_for(user)
    client.get("/studies/")  # warm the session
    with CaptureQueriesContext(connection) as ctx:
        assert client.get("/studies/").status_code == 200
    return len(ctx.captured_queries)


def test_the_number_of_queries_does_not_grow_with_the_rows(bob, krmc, gfc):
    for n in range(3):
        make_study(krmc, n)
    few = _queries_for(bob)
    for n in range(3, 25):
        make_study(krmc, n)
    many = _queries_for(bob)
    assert many == few


def test_the_study_page_lists_its_series(bob, krmc):
    study = make_study(krmc, 7, patient_name="SERIES^TEST")
    Series.objects.create(
        study=study,
        series_instance_uid="9.9.9",
        modality="SR",
        description="Dose report",
        series_number=99,
    )
    response = client_for(bob).get(f"/studies/{study.uuid}/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "SERIES, TEST" in body
    assert "Dose report" in body


def test_html_in_patient_data_is_shown_escaped(client, bob, bob_token):
    data = dicom_bytes(
        "CT_small.dcm",
        StudyInstanceUID="1.2.3.99",
        PatientName="<script>alert(1)</script>^<b>X</b>",
        StudyDescription='<img src=x onerror="alert(2)">',
    )
    assert upload(client, data, token=bob_token).status_code == 201
    study = Study.objects.get(study_instance_uid="1.2.3.99")
    for page in ("/studies/", f"/studies/{study.uuid}/"):
        body = client_for(bob).get(page).content.decode()
        assert "<script>alert(1)</script>" not in body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
        assert "<img src=x" not in body
        assert "&lt;img src=x" in body


# --- "Received": studies shared with me (issue 15, item 2) ------------------------------------


def _shared(study: Study, by: User, **recipient: object) -> None:
    from django.utils import timezone

    from transfers.models import Share

    share = Share.objects.create(
        facility=study.facility,
        created_by=by,
        expires_at=timezone.now() + dt.timedelta(days=10),
        **recipient,
    )
    share.studies.add(study)


@pytest.mark.parametrize(
    ("persona", "expected"),
    [("charlie", ["SHARED, SAM"]), ("dana", ["SHARED, SAM"]), ("bob", []), ("carol", [])],
)
def test_received_lists_studies_shared_with_me_and_no_others(
    request, persona, expected, bob, krmc, gfc, charlie, dana
):
    shared = make_study(krmc, 1, patient_name="SHARED^SAM")
    make_study(krmc, 2, patient_name="UNSHARED^URSULA")
    make_study(gfc, 3, patient_name="THEIRS^OWN")
    _shared(shared, bob, kind="facility", recipient_facility=gfc)
    response = client_for(request.getfixturevalue(persona)).get("/studies/", {"show": "received"})
    assert response.status_code == 200
    assert rows(response) == expected
    assert "UNSHARED" not in response.content.decode()


def test_a_stranger_sees_nothing_received(bob, krmc, gfc):
    stranger_home = Facility.objects.create(name="St. Luke", slug="stluke")
    stranger = User.objects.create_user(email="eve@stluke.example", password="x")
    from portal.models import Membership

    Membership.objects.create(user=stranger, facility=stranger_home, role="reader")
    _shared(
        make_study(krmc, 1, patient_name="SECRET^PATIENT"),
        bob,
        kind="facility",
        recipient_facility=gfc,
    )
    response = client_for(stranger).get("/studies/", {"show": "received"})
    assert rows(response) == []
    assert "SECRET" not in response.content.decode()


def test_received_shows_who_sent_it_and_the_default_stays_our_studies(dana, bob, krmc, gfc):
    _shared(
        make_study(krmc, 1, patient_name="SHARED^SAM"), bob, kind="facility", recipient_facility=gfc
    )
    make_study(gfc, 2, patient_name="OURS^OLGA")
    browser = client_for(dana)
    received = browser.get("/studies/", {"show": "received"}).content.decode()
    assert "<th>From</th>" in received
    assert "Kalispell Regional Medical Center" in received
    assert 'href="/studies/">Our studies</a>' in received
    ours = browser.get("/studies/")
    assert rows(ours) == ["OURS, OLGA"]
    assert 'href="/studies/?show=received">Received</a>' in ours.content.decode()


def test_a_revoked_share_is_no_longer_received(dana, bob, krmc, gfc):
    from django.utils import timezone

    from transfers.models import Share

    _shared(
        make_study(krmc, 1, patient_name="SHARED^SAM"), bob, kind="facility", recipient_facility=gfc
    )
    Share.objects.update(revoked_at=timezone.now())
    assert rows(client_for(dana).get("/studies/", {"show": "received"})) == []


def test_the_empty_worklist_says_what_to_do_next(bob, carol, krmc):
    sender = client_for(bob).get("/studies/").content.decode()
    assert "No studies match" not in sender
    assert "No studies yet." in sender
    assert "Upload studies" in sender
    reader = client_for(carol).get("/studies/").content.decode()
    assert "No studies yet." in reader
    assert "Upload studies" not in reader
    received = client_for(carol).get("/studies/", {"show": "received"}).content.decode()
    assert "Nothing received yet. Studies other facilities share with you appear here." in received


def test_a_search_that_finds_nothing_says_so_and_how_to_widen_it(bob, krmc):
    make_study(krmc, 1, patient_name="DOE^JANE")
    html = client_for(bob).get("/studies/", {"q": "nobody"}).content.decode()
    assert "No studies match this search." in html
    assert "Clear the search" in html
    assert "No studies yet." not in html
