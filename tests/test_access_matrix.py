"""Every page that shows patient data or facility administration, against every persona.

alice: admin at Kalispell; bob: sender at Kalispell; carol: reader at Kalispell;
charlie: sender at Great Falls (an outsider to Kalispell); anon: not signed in.
"""

from __future__ import annotations

import pytest

from tests.helpers import client_for
from tests.transfers.test_worklist import make_study

pytestmark = pytest.mark.django_db

LOGIN = "login"
PERSONAS = ["alice", "bob", "carol", "charlie", "anon"]

# page -> expected answer per persona (an HTTP status, or LOGIN for a redirect to sign in)
MATRIX: dict[str, dict[str, int | str]] = {
    "/": {"alice": 200, "bob": 200, "carol": 200, "charlie": 200, "anon": LOGIN},
    "/studies/?show=received": {
        "alice": 200,
        "bob": 200,
        "carol": 200,
        "charlie": 200,
        "anon": LOGIN,
    },
    "/studies/": {"alice": 200, "bob": 200, "carol": 200, "charlie": 200, "anon": LOGIN},
    "/studies/{study}/": {"alice": 200, "bob": 200, "carol": 200, "charlie": 404, "anon": LOGIN},
    "/upload/": {"alice": 200, "bob": 200, "carol": 404, "charlie": 200, "anon": LOGIN},
    "/facilities/krmc/members/": {
        "alice": 200,
        "bob": 404,
        "carol": 404,
        "charlie": 404,
        "anon": LOGIN,
    },
    "/facilities/krmc/audit/": {
        "alice": 200,
        "bob": 404,
        "carol": 404,
        "charlie": 404,
        "anon": LOGIN,
    },
    "/accounts/profile/": {"alice": 200, "bob": 200, "carol": 200, "charlie": 200, "anon": LOGIN},
}


@pytest.mark.parametrize("persona", PERSONAS)
@pytest.mark.parametrize("page", list(MATRIX))
def test_access(request, persona, page, krmc, gfc):
    user = None if persona == "anon" else request.getfixturevalue(persona)
    study = make_study(krmc, 1, patient_name="SECRET^PATIENT")
    response = client_for(user).get(page.format(study=study.uuid))
    expected = MATRIX[page][persona]
    if expected == LOGIN:
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
    else:
        assert response.status_code == expected
    # An outsider's lists (home, worklist, received) never show Kalispell's patient.
    if (
        expected != 200
        or page in ("/", "/studies/", "/studies/?show=received")
        and persona == "charlie"
    ):
        assert b"SECRET" not in response.content


@pytest.mark.parametrize("persona", ["bob", "carol", "charlie"])
def test_only_admins_change_members(request, persona, alice, krmc):
    from portal.models import Membership

    user = request.getfixturevalue(persona)
    target = Membership.objects.get(user=alice)
    response = client_for(user).post(f"/facilities/krmc/members/{target.pk}/remove/")
    assert response.status_code == 404
    assert Membership.objects.filter(pk=target.pk).exists()
    response = client_for(user).post(
        "/facilities/krmc/members/", {"email": "x@example.org", "role": "admin"}
    )
    assert response.status_code == 404
