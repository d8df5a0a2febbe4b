"""Response headers (issue 13, finding 14): no-store on everything that carries PHI or a secret,
a Content-Security-Policy without inline script, Permissions-Policy and Cross-Origin-Opener-Policy.

The walk resolves every URL pattern in `relay.urls` (the access matrix's pages, the viewer's
frames and thumbnails, downloads, CSVs, the API, allauth's pages and the admin), fills the path
with real values of one shared study, and asks for each as a signed-in staff admin, as a patient
session and anonymously. Every answer, 200 or refusal, must carry the four headers; the pages that
show the study must really have been shown (200), so the walk is not only of 404s.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from portal.models import Facility, Membership, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Instance, Share, Study, StudyStatus
from transfers.reports import report_attach
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"
PATIENT_NAME = "SECRET^PATIENT"

# Answers that must be 200 for the persona: the PHI and secrets the headers protect.
MEMBER_PAGES = [
    "/studies/",
    "/studies/{study_uuid}/",
    "/studies/{study_uuid}/reports/{report_uuid}/",
    "/studies/{study_uuid}/download/",
    "/studies/{study_uuid}/view/",
    "/studies/{study_uuid}/view/study.json",
    "/studies/{study_uuid}/view/frames/{sop_uid}/0/",
    "/studies/{study_uuid}/view/thumbs/{series_uid}/",
    "/upload/",
    "/inbox/",
    "/sent/",
    "/share/?study={study_uuid}",
    "/shares/{share_uuid}/",
    "/facilities/krmc/members/",
    "/facilities/krmc/audit/",
    "/facilities/krmc/audit/export/",
    "/facilities/krmc/billing/",
    "/facilities/krmc/dicom/",
    "/billing/",
    "/billing/usage.csv?start=2025-03-01&end=2025-03-31",
    "/accounts/profile/",
    "/accounts/2fa/",
    "/admin/",
    "/admin/portal/user/",
]
PATIENT_PAGES = [
    "/p/{token}/studies/",
    "/p/{token}/studies/{study_uuid}/view/",
    "/p/{token}/studies/{study_uuid}/view/study.json",
    "/p/{token}/studies/{study_uuid}/view/frames/{sop_uid}/0/",
    "/p/{token}/studies/{study_uuid}/view/thumbs/{series_uid}/",
    "/p/{token}/studies/{study_uuid}/download/",
    "/p/{token}/studies/{study_uuid}/reports/{report_uuid}/",
]

_GROUP = re.compile(r"<(?:(?P<conv>\w+):)?(?P<name>\w+)>|\(\?P<(?P<rname>\w+)>[^)]*\)")


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[str]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            assert isinstance(pattern, URLPattern)
            yield prefix + str(pattern.pattern)


def all_routes() -> list[str]:
    # Signing out last: the walk keeps its session to the end.
    routes = sorted(set(_routes(get_resolver().url_patterns)))
    return sorted(routes, key=lambda r: "logout" in r or "sign-out" in r)


def _fill(route: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group("name") or match.group("rname")
        return quote(values.get(name, "1"), safe="")

    path = _GROUP.sub(one, route).replace("^", "").replace("$", "")
    return "/" + path.replace("\\", "")


class World:
    """A Kalispell study with a report, shared with Great Falls and by a patient link; alice is
    Kalispell's admin and staff, the patient has answered the link's second factor."""

    def __init__(self, alice: User, bob: User, bob_token: str, gfc: Facility) -> None:
        alice.is_staff = alice.is_superuser = True
        alice.save()
        for n in range(2):
            data = dicom_bytes(
                "CT_small.dcm",
                PatientName=PATIENT_NAME,
                PatientBirthDate=BIRTH_DATE.replace("-", ""),
                StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",
                InstanceNumber=n + 1,
            )
            assert upload(Client(), data, token=bob_token).status_code == 201
        Study.objects.update(status=StudyStatus.COMPLETE)
        self.study = Study.objects.get()
        instance = Instance.objects.select_related("series").first()
        assert instance is not None
        report = report_attach(
            study=self.study, by=bob, text="No acute findings.", for_patient=True
        )
        share, _ = share_create(
            facility=self.study.facility,
            created_by=bob,
            studies=[self.study],
            kind="facility",
            recipient_facility=gfc,
            can_download=True,
        )
        self.patient_share, token = share_create(
            facility=self.study.facility,
            created_by=bob,
            studies=[self.study],
            kind="patient",
            second_factor="birth_date",
            can_download=True,
        )
        assert token is not None
        self.values = {
            "slug": "krmc",
            "study_uuid": str(self.study.uuid),
            "share_uuid": str(share.uuid),
            "report_uuid": str(report.uuid),
            "sop_uid": instance.sop_instance_uid,
            "series_uid": instance.series.series_instance_uid,
            "frame": "0",
            "token": token,
            "member_id": str(Membership.objects.get(user=alice).pk),
        }
        self.alice = alice

    def member(self) -> Client:
        client = client_for(self.alice)
        client.raise_request_exception = False
        return client

    def patient(self) -> Client:
        client = Client(raise_request_exception=False)
        answer = client.post(f"/p/{self.values['token']}/", {"birth_date": BIRTH_DATE})
        assert answer.status_code == 302
        return client

    def path(self, route: str) -> str:
        return route.format(**self.values)


@pytest.fixture
def world(alice: User, bob: User, bob_token: str, gfc: Facility) -> World:
    return World(alice, bob, bob_token, gfc)


def _get(client: Client, path: str) -> Any:
    response: Any = client.get(path)
    if getattr(response, "streaming", False):
        b"".join(response.streaming_content)  # the test client closes it at the end
    return response


def _directives(policy: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for part in policy.split(";"):
        words = part.split()
        if words:
            found[words[0].lower()] = words[1:]
    return found


def header_problems(response: Any) -> list[str]:
    """What is wrong with a PHI answer's headers (empty: nothing)."""
    problems = []
    cache = response.get("Cache-Control", "")
    if "no-store" not in cache:
        problems.append(f"Cache-Control {cache!r}")
    if "max-age=3600" in cache or "public" in cache:
        problems.append(f"Cache-Control still allows keeping it: {cache!r}")
    policy = response.get("Content-Security-Policy")
    if not policy:
        problems.append("no Content-Security-Policy")
    else:
        csp = _directives(policy)
        script = csp.get("script-src", csp.get("default-src"))
        if not script or "'unsafe-inline'" in script or "'unsafe-eval'" in script:
            problems.append(f"script-src {script}")
        if "'unsafe-inline'" in csp.get("style-src", []):
            problems.append("style-src 'unsafe-inline'")
        if csp.get("object-src") != ["'none'"] or csp.get("frame-ancestors") != ["'none'"]:
            problems.append(f"object-src/frame-ancestors {policy}")
    if "camera=()" not in response.get("Permissions-Policy", ""):
        problems.append(f"Permissions-Policy {response.get('Permissions-Policy')!r}")
    if response.get("Cross-Origin-Opener-Policy") != "same-origin":
        problems.append(f"COOP {response.get('Cross-Origin-Opener-Policy')!r}")
    return problems


@pytest.mark.parametrize("persona", ["member", "patient", "anonymous"])
def test_it_sends_no_store_csp_and_policies_on_every_url(world: World, persona: str) -> None:
    client = {"member": world.member, "patient": world.patient, "anonymous": Client}[persona]()
    routes = all_routes()
    assert len(routes) > 100  # every app's URLs, allauth's and the admin's
    failures = []
    statuses: dict[str, int] = {}
    for route in routes:
        path = _fill(route, world.values)
        response = _get(client, path)
        statuses[path] = response.status_code
        for problem in header_problems(response):
            failures.append(f"GET {path} {response.status_code}: {problem}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:60])
    # ... and the walk really reached the patient data it is about.
    must = {"member": MEMBER_PAGES, "patient": PATIENT_PAGES, "anonymous": []}[persona]
    client = {"member": world.member, "patient": world.patient, "anonymous": Client}[persona]()
    for page in must:
        response = _get(client, world.path(page))
        assert response.status_code == 200, page
        assert not header_problems(response), (page, header_problems(response))


@pytest.mark.parametrize("viewer", ["member", "patient"])
def test_frames_and_thumbnails_are_no_store_not_private_max_age(world: World, viewer: str) -> None:
    client = world.member() if viewer == "member" else world.patient()
    prefix = "" if viewer == "member" else "/p/{token}"
    for page in (
        prefix + "/studies/{study_uuid}/view/frames/{sop_uid}/0/",
        prefix + "/studies/{study_uuid}/view/thumbs/{series_uid}/",
    ):
        response = _get(client, world.path(page))
        assert response.status_code == 200
        assert response["Cache-Control"] == "no-store"
        assert "Cookie" in response.get("Vary", "")


def test_the_profile_page_showing_a_new_api_token_is_no_store(world: World) -> None:
    client = world.member()
    created = client.post(
        "/accounts/tokens/", {"name": "pacs", "facility": "krmc", "access": "write", "days": "30"}
    )
    assert created.status_code == 302
    assert "no-store" in created["Cache-Control"]  # the redirect too
    page = _get(client, "/accounts/profile/")
    token = client.session.get("new_api_token")
    assert token is None  # shown once, then gone
    assert re.search(rb"rly_[A-Za-z0-9_-]{20,}|[A-Za-z0-9_-]{40,}", page.content)
    assert not header_problems(page)


def test_refusals_and_redirects_of_the_middleware_below_are_no_store_too(world: World) -> None:
    # The sign-in redirect (login_required) and the second-factor wall (middleware).
    anonymous = _get(Client(), world.path("/studies/{study_uuid}/"))
    assert anonymous.status_code == 302
    assert not header_problems(anonymous)
    half = client_for(world.alice, second_factor=False)
    walled = _get(half, world.path("/studies/{study_uuid}/"))
    assert walled.status_code == 302
    assert not header_problems(walled)


def test_the_handout_has_no_inline_style_and_passes_the_header_checks(world: World) -> None:
    """The handout's print layout moved into relay.css (its @media print rules): the page needs
    no inline style and so no style nonce; the token shows and the headers hold."""
    client = world.member()
    share = Share.objects.get(kind="patient")
    session = client.session
    session[f"patient_link_{share.uuid}"] = world.values["token"]
    session.save()
    response = _get(client, f"/shares/{share.uuid}/handout/")
    assert response.status_code == 200
    assert world.values["token"].encode() in response.content
    assert b"<style" not in response.content
    assert b" style=" not in response.content
    assert not header_problems(response)


def test_no_template_has_inline_script_or_style_without_a_nonce() -> None:
    from pathlib import Path

    from django.conf import settings

    inline_script = re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>", re.I)
    inline_style = re.compile(r"<style(?![^>]*\bnonce=)[^>]*>", re.I)
    handlers = re.compile(r"\son[a-z]+\s*=\s*[\"']", re.I)
    import allauth

    found = []
    ours = list(Path(settings.BASE_DIR, "templates").rglob("*.html"))
    # allauth's own pages render in our layout: only JSON data blocks and script files there.
    theirs = list(Path(allauth.__file__).parent.joinpath("templates").rglob("*.html"))
    for template in ours + theirs:
        if "emails" in template.parts:
            continue  # e-mail bodies: no CSP applies, and mail readers want inline styles
        text = template.read_text()
        for pattern in (inline_script, inline_style, handlers):
            found += [f"{template.name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not found


def test_static_files_keep_their_caching(world: World) -> None:
    for path in ("/static/js/session.js", "/static/js/viewer/main.js", "/static/css/relay.css"):
        response = _get(Client(), path)
        assert response.status_code == 200, path
        cache = response.get("Cache-Control", "")
        assert "no-store" not in cache
        assert "max-age=" in cache


def test_the_zip_download_is_no_store(world: World) -> None:
    import zipfile

    response: Any = world.member().get(world.path("/studies/{study_uuid}/download/"))
    body = b"".join(response.streaming_content)
    assert "DICOMDIR" in zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert not header_problems(response)
