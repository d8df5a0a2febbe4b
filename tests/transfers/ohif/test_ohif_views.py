"""Serving OHIF under /ohif/ (transfers/ohif/views.py): signed-in users only; the site's files
with their own Content-Security-Policy and caching (no PHI in them); the app's routes answered
with index.html; nothing outside the site, whatever the path; a page saying how to install it
when it is not there. Portal pages keep the portal's strict policy and no-store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from portal.models import User
from tests.helpers import client_for

pytestmark = pytest.mark.django_db

OHIF_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval'; "
    "worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self' data:; object-src 'none'; base-uri 'self'; "
    "frame-ancestors 'none'; form-action 'self'"
)


def _directives(policy: str) -> dict[str, set[str]]:
    return {p.split()[0]: set(p.split()[1:]) for p in policy.split(";") if p.strip()}


def _body(response: Any) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_it_sends_the_sign_in_page_to_anonymous_users(ohif_site: Path) -> None:
    response = Client().get("/ohif/viewer?StudyInstanceUIDs=1.2.3")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
    assert "no-store" in response["Cache-Control"]
    assert "unsafe-eval" not in response["Content-Security-Policy"]


@pytest.mark.parametrize("path", ["/ohif/", "/ohif/viewer", "/ohif/viewer/dicomweb", "/ohif/local"])
def test_the_app_routes_answer_index_html_with_ohifs_policy(
    ohif_site: Path, bob: User, path: str
) -> None:
    response = client_for(bob).get(path + "?StudyInstanceUIDs=1.2.3")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script src="/ohif/relay-boot.js"></script>' in _body(response)
    assert _directives(response["Content-Security-Policy"]) == _directives(OHIF_POLICY)
    assert response["Cache-Control"] == "no-cache"


@pytest.mark.parametrize(
    ("name", "content_type", "cache"),
    [
        ("0ddf166f7a343eda.wasm", "application/wasm", "private, max-age=31536000, immutable"),
        (
            "8097.bundle.8ae6404ba94890a0.js",
            "text/javascript",
            "private, max-age=31536000, immutable",
        ),
        ("app-config.js", "text/javascript", "no-cache"),
        ("relay-boot.js", "text/javascript", "no-cache"),
        ("app.bundle.css", "text/css", "no-cache"),
        ("manifest.json", "application/json", "no-cache"),
    ],
)
def test_each_file_has_its_type_caching_and_ohifs_policy(
    ohif_site: Path, bob: User, name: str, content_type: str, cache: str
) -> None:
    response = client_for(bob).get(f"/ohif/{name}")
    assert response.status_code == 200
    assert response["Content-Type"] == content_type
    assert response["Cache-Control"] == cache
    assert _body(response) == (ohif_site / name).read_bytes()
    policy = _directives(response["Content-Security-Policy"])
    assert "'wasm-unsafe-eval'" in policy["script-src"] and "blob:" in policy["worker-src"]


def test_a_missing_asset_is_a_404_not_the_apps_html(ohif_site: Path, bob: User) -> None:
    response = client_for(bob).get("/ohif/9999.bundle.0123456789abcdef.js")
    assert response.status_code == 404
    assert "no-store" in response["Cache-Control"]


@pytest.mark.parametrize(
    "path",
    [
        "/ohif/../secret.txt",
        "/ohif/../../settings.py",
        "/ohif/%2e%2e/secret.txt",
        "/ohif/..%2fsecret.txt",
        "/ohif/assets/../../secret.txt",
        "/ohif//etc/passwd",
        "/ohif/..\\secret.txt",
        "/ohif/outside.txt",  # a link from the site to a file outside it
    ],
)
def test_no_path_leaves_the_site(ohif_site: Path, bob: User, path: str) -> None:
    secret = ohif_site.parent / "secret.txt"
    secret.write_text("NOT FOR THE BROWSER")
    os.symlink(secret, ohif_site / "outside.txt")
    response = client_for(bob).get(path)
    assert response.status_code in (200, 404)
    body = _body(response)
    assert b"NOT FOR THE BROWSER" not in body and b"root:" not in body
    if response.status_code == 200:  # an app route of its own: the app, nothing else
        assert body == (ohif_site / "index.html").read_bytes()


def test_without_an_install_it_says_how_to_add_one(bob: User) -> None:
    response = client_for(bob).get("/ohif/viewer?StudyInstanceUIDs=1.2.3")
    assert response.status_code == 404
    page = response.content.decode()
    assert "advanced viewer (OHIF) is not installed" in page
    assert "make install" in page and "manage.py ohif_install" in page
    # A portal page: the portal's policy and no-store.
    assert "unsafe-eval" not in response["Content-Security-Policy"]
    assert "no-store" in response["Cache-Control"]


def test_portal_pages_keep_their_own_policy(ohif_site: Path, bob: User) -> None:
    client = client_for(bob)
    assert client.get("/ohif/").status_code == 200
    response = client.get("/studies/")
    assert response.status_code == 200
    policy = _directives(response["Content-Security-Policy"])
    assert {word for word in policy["script-src"] if not word.startswith("'nonce-")} == {"'self'"}
    assert "worker-src" not in policy
    assert "no-store" in response["Cache-Control"]


def test_the_study_uid_in_ohifs_address_is_redacted_from_logs() -> None:
    from relay.logs import redact

    line = '"GET /ohif/viewer?StudyInstanceUIDs=1.2.826.0.1.3680043.8.498.1 HTTP/1.1" 200'
    assert "1.2.826.0.1.3680043.8.498.1" not in redact(line)
