"""The admin site says it is Relay's, not stock Django's."""

from __future__ import annotations

from portal.models import User
from tests.helpers import client_for


def test_the_admin_index_is_branded_relay(operator: User) -> None:
    operator.is_superuser = True
    operator.save()
    html = client_for(operator).get("/admin/").content.decode()
    assert "<title>Relay: facilities, people, plans and invoices | Relay administration" in html
    assert ">Relay administration</a>" in html
    assert "Django administration" not in html
