"""Form errors read as sentences beside their field, never Django's raw list of field names
(issue 15: "readable form errors everywhere"; the members page printed
`<ul class="errorlist"><li>email<ul ...>` above the form)."""

from __future__ import annotations

import pytest

from tests.helpers import client_for

pytestmark = pytest.mark.django_db


def test_the_invitation_form_says_what_is_wrong_beside_the_field(alice, krmc) -> None:
    response = client_for(alice).post(
        "/facilities/krmc/members/", {"email": "not an address", "role": "reader"}
    )
    html = response.content.decode()
    assert "Enter a valid email address." in html
    # Beside the field, as a sentence: not a list keyed by the field's name.
    assert '<span class="field-error" role="alert">Enter a valid email address.</span>' in html
    assert "<li>email" not in html
