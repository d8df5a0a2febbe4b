"""Issue 15, finding 3: Relay's own 400, 403, 404 and 500 pages (the site's look, a short
message and a way home) instead of Django's bare "Not Found"; the 500 page renders without the
request and without the database, and shows no traceback; a favicon, linked and at /favicon.ico.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from django.urls import include, path
from django.views.defaults import server_error

from portal.models import User
from tests.helpers import client_for

SECRET = "boom-6f1d: patient Doe^Jane"


def _forbidden(request: HttpRequest) -> HttpResponse:
    raise PermissionDenied("not for you")


def _broken(request: HttpRequest) -> HttpResponse:
    raise RuntimeError(SECRET)


# This module is also the URLconf of the tests marked with it: Relay's URLs plus two views
# that fail on purpose. No handler is set here, as none is in relay.urls: Django's own
# handlers render the templates named 400.html, 403.html, 404.html and 500.html.
urlpatterns = [
    path("test-errors/forbidden/", _forbidden),
    path("test-errors/broken/", _broken),
    path("", include("relay.urls")),
]


def _assert_relay_page(html: str) -> None:
    assert '<link rel="stylesheet" href="/static/css/relay.css">' in html
    assert '<a class="brand" href="/">Relay</a>' in html
    assert 'href="/static/favicon.svg"' in html
    assert "Go to Relay's home page" in html


@pytest.fixture
def reader(carol: User) -> Client:
    return client_for(carol)


@pytest.mark.django_db
def test_it_shows_a_relay_page_for_an_unknown_address(reader):
    page = reader.get("/no-such-page/")

    assert page.status_code == 404
    html = page.content.decode()
    _assert_relay_page(html)
    assert "<h1>Page not found</h1>" in html
    assert "<h1>Not Found</h1>" not in html
    # Signed in, the reader keeps the menu and the way to sign out.
    assert "carol@krmc.example" in html
    assert "Sign out" in html


@pytest.mark.django_db
def test_it_shows_a_relay_page_when_a_study_is_not_there(reader):
    page = reader.get("/studies/00000000-0000-0000-0000-000000000000/")

    assert page.status_code == 404
    _assert_relay_page(page.content.decode())


@pytest.mark.django_db
@pytest.mark.urls(__name__)
def test_it_shows_a_relay_page_when_permission_is_denied(reader):
    page = reader.get("/test-errors/forbidden/")

    assert page.status_code == 403
    html = page.content.decode()
    _assert_relay_page(html)
    assert "<h1>Not allowed</h1>" in html
    assert "403 Forbidden" not in html


@pytest.mark.django_db
def test_it_shows_a_relay_page_when_a_form_expired(carol):
    browser = client_for(carol)
    browser.handler.enforce_csrf_checks = True

    page = browser.post("/accounts/logout/", {})

    assert page.status_code == 403
    html = page.content.decode()
    _assert_relay_page(html)
    assert "<h1>This form has expired</h1>" in html
    assert "CSRF verification failed" not in html


@pytest.mark.django_db
def test_it_shows_a_relay_page_for_a_bad_request(client):
    page = client.get("/", HTTP_HOST="relay.evil.example")

    assert page.status_code == 400
    html = page.content.decode()
    _assert_relay_page(html)
    assert "<h1>Bad request</h1>" in html


@pytest.mark.django_db
@pytest.mark.urls(__name__)
def test_it_shows_a_relay_page_and_no_traceback_when_a_view_fails(reader, caplog):
    reader.raise_request_exception = False

    page = reader.get("/test-errors/broken/")

    assert page.status_code == 500
    html = page.content.decode()
    _assert_relay_page(html)
    assert "<h1>Something went wrong</h1>" in html
    assert SECRET not in html
    assert "Traceback" not in html
    assert "RuntimeError" not in html
    assert "Server Error (500)" not in html
    # The operators get the error in the log instead.
    assert any(r.exc_info and r.exc_info[1].args == (SECRET,) for r in caplog.records)


def test_the_500_page_needs_no_request_and_no_database():
    # No django_db mark: any query raises. Django's handler renders 500.html with no context.
    page = server_error(RequestFactory().get("/studies/"))

    assert page.status_code == 500
    _assert_relay_page(page.content.decode())


@pytest.mark.django_db
def test_favicon_ico_leads_to_the_svg(client):
    answer = client.get("/favicon.ico")

    assert answer.status_code in {301, 302}
    assert answer["Location"] == "/static/favicon.svg"
    icon: Any = client.get(answer["Location"])
    assert icon.status_code == 200
    assert icon["Content-Type"] == "image/svg+xml"
    svg = b"".join(icon.streaming_content)
    assert svg.startswith(b"<svg") and b"</svg>" in svg


@pytest.mark.django_db
def test_the_pages_link_the_favicon(client, carol):
    sign_in = client.get("/accounts/login/").content.decode()
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in sign_in
    worklist = client_for(carol).get("/studies/").content.decode()
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in worklist
