"""API tokens: one facility, read or read-write, an expiry, the last use shown, refusals audited
and throttled per address."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from portal.models import ApiToken, AuditEvent, Membership
from portal.services import ServiceError, api_token_create
from tests.helpers import client_for, read_testdata, upload

pytestmark = pytest.mark.django_db


def test_a_token_made_on_the_profile_page_has_a_facility_an_access_and_an_expiry(bob, krmc):
    client_for(bob).post(
        "/accounts/tokens/",
        {"name": "CD station", "facility": krmc.pk, "access": "read", "days": 7},
    )
    token = ApiToken.objects.get(user=bob)
    assert (token.facility, token.access) == (krmc, "read")
    assert timedelta(days=6, hours=23) < token.expires_at - timezone.now() <= timedelta(days=7)
    event = AuditEvent.objects.get(action="token_create")
    assert event.facility == krmc
    assert event.detail["access"] == "read" and event.detail["days"] == 7


def test_an_expired_token_is_refused_and_the_refusal_audited(bob, krmc):
    token, raw = ApiToken.issue(user=bob, name="old", facility=krmc, days=7)
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    response = upload(Client(REMOTE_ADDR="10.2.3.4"), read_testdata("CT_small.dcm"), token=raw)
    assert response.status_code == 401
    assert "expired" in response.json()["reason"]
    refused = AuditEvent.objects.get(action="token_refused")
    assert (refused.outcome, refused.client_ip, refused.detail["reason"]) == (
        "failure",
        "10.2.3.4",
        "expired",
    )
    assert raw not in str(refused.detail)


def test_a_token_works_only_for_its_facility(charlie, gfc, krmc):
    # charlie may upload to both facilities; his token is for Great Falls only.
    Membership.objects.create(user=charlie, facility=krmc, role="sender")
    _, raw = ApiToken.issue(user=charlie, name="gfc only", facility=gfc)
    other = upload(Client(), read_testdata("CT_small.dcm"), token=raw, facility="krmc")
    assert other.status_code == 403
    mine = upload(Client(), read_testdata("CT_small.dcm"), token=raw, facility="gfc")
    assert mine.status_code == 201
    listed = Client().get("/api/v1/facilities", HTTP_AUTHORIZATION=f"Bearer {raw}").json()
    assert [f["slug"] for f in listed["facilities"]] == ["gfc"]


def test_a_read_token_checks_what_is_stored_but_cannot_upload(bob, krmc):
    _, raw = ApiToken.issue(user=bob, name="reader", facility=krmc, access="read")
    refused = upload(Client(), read_testdata("CT_small.dcm"), token=raw)
    assert refused.status_code == 403
    assert "read-only" in refused.json()["reason"]
    known = Client().post(
        "/api/v1/instances/known",
        data={"facility": "krmc", "sop_instance_uids": ["1.2.3"]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )
    assert known.status_code == 200


def test_a_reader_cannot_make_an_uploading_token(carol, krmc):
    with pytest.raises(ServiceError, match="cannot upload"):
        api_token_create(user=carol, name="x", facility=krmc, access="write")
    token, _ = api_token_create(user=carol, name="x", facility=krmc, access="read")
    assert token.access == "read"


def test_last_use_and_address_are_recorded(bob, krmc):
    token, raw = ApiToken.issue(user=bob, name="t", facility=krmc)
    upload(Client(REMOTE_ADDR="10.7.7.7"), read_testdata("CT_small.dcm"), token=raw)
    token.refresh_from_db()
    assert token.last_used_at is not None
    assert token.last_used_ip == "10.7.7.7"
    page = client_for(bob).get("/accounts/profile/").content.decode()
    assert "10.7.7.7" in page


def test_an_address_sending_bad_tokens_is_throttled(bob, krmc):
    _, good = ApiToken.issue(user=bob, name="t", facility=krmc)
    attacker = Client(REMOTE_ADDR="198.51.100.66")
    codes = [
        attacker.get("/api/v1/facilities", HTTP_AUTHORIZATION=f"Bearer rly_guess{n}").status_code
        for n in range(21)
    ]
    assert codes[:20] == [401] * 20
    assert codes[20] == 429
    # Blocked from that address even with a good token; fine from another.
    assert (
        attacker.get("/api/v1/facilities", HTTP_AUTHORIZATION=f"Bearer {good}").status_code == 429
    )
    assert (
        Client().get("/api/v1/facilities", HTTP_AUTHORIZATION=f"Bearer {good}").status_code == 200
    )
    assert AuditEvent.objects.filter(action="token_refused").count() == 20


def test_refusals_of_a_scoped_or_read_token_are_audited(charlie, gfc, krmc):
    _, raw = ApiToken.issue(user=charlie, name="gfc", facility=gfc, access="read")
    assert (
        upload(Client(), read_testdata("CT_small.dcm"), token=raw, facility="gfc").status_code
        == 403
    )
    other = Client().post(
        "/api/v1/instances/known",
        data={"facility": "krmc", "sop_instance_uids": []},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )
    assert other.status_code == 403
    refused = AuditEvent.objects.filter(action="access_denied")
    assert {e.detail["reason"] for e in refused} == {
        "This API token is read-only.",
        "You cannot read a facility 'krmc'.",
    }
    assert refused.get(detail__reason__startswith="You cannot").facility == krmc


def test_a_readers_read_token_checks_what_its_facility_stores(carol, krmc):
    token, raw = api_token_create(user=carol, name="x", facility=krmc, access="read")
    known = Client().post(
        "/api/v1/instances/known",
        data={"facility": "krmc", "sop_instance_uids": ["1.2.3"]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )
    assert known.status_code == 200
    assert known.json()["known"] == []
