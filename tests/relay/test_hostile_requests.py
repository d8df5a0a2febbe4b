"""Hostile requests get a 4xx, never a 500 or a traceback in the log (issue 13, findings 5 and 7).

The URL walk resolves every pattern in `relay.urls`, fills its path converters with hostile
values (NUL, '%00', SQL, a huge number, a very long string, unicode, '../'), sends every query
parameter and form field the views read with the same values, GET and POST, as an anonymous
visitor, a signed-in member and an API token, and asserts no 5xx and no logged traceback. NUL
bytes only break PostgreSQL: CI runs this module with DATABASE_URL set too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, dicom_bytes, upload

HOSTILE = [
    "\x00",
    "%00",
    "a\x00b",
    "' OR 1=1--",
    str(10**30),
    "-" + str(10**30),
    "A" * 5000,
    "ünïcødé ☃ \U0001f600",
    "../../etc/passwd",
]

# Every query parameter and form field a view of ours reads (grep of request.GET/POST and forms).
PARAMS = (
    "access action ae_title amount app birth_date can_download can_import can_view date_from "
    "date_to days destination email email_domains end expires_on facility for_patient format "
    "frame_url from full_name gateway_addresses gateway_calling_aes gateway_client_certificates "
    "gateway_tls_required invoice issuer kind listed "
    "login message modality month name next outcome page password password1 password2 "
    "patient_id patient_name pin port push q recipient_email recipient_facility report_text "
    "require_mfa role role_map search second_factor series sort start study study_uid text tls "
    "tls_ca_certificates to "
    "username who"
).split()

_GROUP = re.compile(r"<(?:(?P<conv>\w+):)?(?P<name>\w+)>|\(\?P<(?P<rname>\w+)>[^)]*\)")


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[str]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            assert isinstance(pattern, URLPattern)
            yield prefix + str(pattern.pattern)


def all_routes() -> list[str]:
    return sorted(set(_routes(get_resolver().url_patterns)))


def _fill(route: str, value: Any) -> str:
    """The route as a path, every converter or regex group replaced by `value` (a callable of
    the converter's name, or one string), percent-encoded as a client would send it."""

    def one(match: re.Match[str]) -> str:
        name = match.group("name") or match.group("rname")
        raw = value(name) if callable(value) else value
        return quote(str(raw), safe="")

    path = _GROUP.sub(one, route).replace("^", "").replace("$", "")
    return "/" + path.replace("\\", "")


def _hostile_fields(value: str) -> dict[str, str]:
    return dict.fromkeys(PARAMS, value)


LIMIT_MIDDLEWARE = {
    "relay.limits.HostileRequestMiddleware": "django.middleware.security.SecurityMiddleware",
    "relay.limits.AnonymousBodyLimitMiddleware": "portal.middleware.SessionTimeoutMiddleware",
}


@pytest.fixture(autouse=True)
def _limits_installed(settings: Any) -> None:
    """relay/limits.py's middlewares where relay/settings.py puts them (a no-op once it does)."""
    middleware = list(settings.MIDDLEWARE)
    for name, after in LIMIT_MIDDLEWARE.items():
        if name not in middleware:
            middleware.insert(middleware.index(after) + 1, name)
    settings.MIDDLEWARE = middleware


@pytest.fixture
def world(
    krmc: Facility, gfc: Facility, bob: User, charlie: User, bob_token: str
) -> dict[str, Any]:
    """A study at Kalispell shared with Great Falls, so valid path values reach the views."""
    from transfers.models import Study
    from transfers.sharing.services import share_create

    response = upload(client_for(bob), dicom_bytes())
    assert response.status_code == 201, response.content
    study = Study.objects.get()
    share, _ = share_create(
        facility=krmc,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
        expires_at=timezone.now() + timedelta(days=7),
    )
    valid = {
        "slug": "krmc",
        "study_uuid": str(study.uuid),
        "share_uuid": str(share.uuid),
        "study": str(study.uuid),
    }
    return {"valid": valid, "token": bob_token, "bob": bob}


def _clients(world: dict[str, Any]) -> dict[str, tuple[Client, dict[str, Any]]]:
    anonymous = Client(raise_request_exception=False)
    member = client_for(world["bob"])
    member.raise_request_exception = False
    api = Client(raise_request_exception=False)
    return {
        "anonymous": (anonymous, {}),
        "member": (member, {}),
        "token": (api, {"HTTP_AUTHORIZATION": f"Bearer {world['token']}"}),
    }


def _problems(caplog: Any) -> list[str]:
    found = []
    for record in caplog.records:
        # django.security logs a refused request (DisallowedRedirect, RequestDataTooBig) as an
        # error with no traceback while answering 400: that is the clean answer, not a fault.
        refused = record.name.startswith("django.security") and not record.exc_info
        if (record.levelno >= logging.ERROR and not refused) or record.exc_info:
            found.append(f"{record.name}: {record.getMessage()[:200]}")
    if "Traceback" in caplog.text:
        found.append("a traceback in the log")
    return found


@pytest.mark.django_db(transaction=False)
@pytest.mark.parametrize("persona", ["anonymous", "member", "token"])
def test_it_answers_every_url_with_hostile_values_without_a_500(
    persona: str, world: dict[str, Any], caplog: Any
) -> None:
    client, headers = _clients(world)[persona]
    valid = world["valid"]
    failures: list[str] = []
    routes = all_routes()
    assert len(routes) > 100  # the walk really sees every app's URLs
    caplog.set_level(logging.WARNING)
    for route in routes:
        for value in HOSTILE:
            # Every parameter at once; a long value is cut so the URL stays under the 8 KB
            # limit (a longer one is a 414, tested below) and reaches the views.
            query = urlencode(_hostile_fields(value[:100]))
            hostile_path = _fill(route, value)
            valid_path = _fill(route, lambda name, v=value: valid.get(name, v))
            requests = [
                ("GET", hostile_path, None),
                ("POST", hostile_path, _hostile_fields(value)),
                ("GET", f"{valid_path}?{query}", None),
                ("POST", f"{valid_path}?{query}", _hostile_fields(value)),
            ]
            for method, path, data in requests:
                caplog.clear()
                if method == "GET":
                    response = client.get(path, **headers)
                else:
                    response = client.post(path, data, **headers)
                problems = _problems(caplog)
                if response.status_code >= 500 or problems:
                    failures.append(
                        f"{method} {route} value={value[:20]!r} -> {response.status_code} "
                        f"{problems[:1]}"
                    )
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(sorted(set(failures))[:80])


# --- the findings one by one -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/instances/known", "/api/v1/manifests"])
def test_it_refuses_deeply_nested_json_with_a_400(
    path: str, krmc: Facility, bob_token: str, caplog: Any
) -> None:
    client = Client(raise_request_exception=False)
    response = client.post(
        path,
        data="[" * 100_000,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code == 400
    assert "nested more than" in response.json()["reason"]
    assert not _problems(caplog)


def test_it_refuses_json_nested_beyond_the_limit_but_reads_what_the_uploader_sends(
    krmc: Facility, bob_token: str
) -> None:
    from transfers.api import JSON_MAX_DEPTH

    client = Client()
    auth: dict[str, Any] = {"HTTP_AUTHORIZATION": f"Bearer {bob_token}"}
    body = {"facility": "krmc", "sop_instance_uids": ["1.2.3"]}
    ok = client.post("/api/v1/instances/known", body, "application/json", **auth)
    assert ok.status_code == 200
    # Brackets inside strings are not nesting.
    body["sop_instance_uids"] = ["[" * 1000]
    ok = client.post("/api/v1/instances/known", body, "application/json", **auth)
    assert ok.status_code == 200
    deep: Any = "1.2.3"
    for _ in range(JSON_MAX_DEPTH):
        deep = [deep]
    nested = client.post(
        "/api/v1/instances/known",
        json.dumps({"facility": "krmc", "sop_instance_uids": deep}),
        "application/json",
        **auth,
    )
    assert nested.status_code == 400
    assert "nested more than" in nested.json()["reason"]


def test_a_full_size_manifest_is_not_refused_for_its_size(krmc: Facility, bob_token: str) -> None:
    # 20,000 entries (the manifest's limit) are about 3.5 MB, over Django's 2.5 MB default cap.
    entries = [
        {"sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{n:020d}", "sha256": "0" * 64}
        for n in range(20_000)
    ]
    body = json.dumps({"facility": "krmc", "instances": entries})
    assert len(body) > 2_621_440
    response = Client().post(
        "/api/v1/manifests", body, "application/json", HTTP_AUTHORIZATION=f"Bearer {bob_token}"
    )
    assert response.status_code in (200, 400)
    assert "limit" not in response.json().get("reason", "")


def test_it_refuses_a_json_body_over_the_size_limit_with_a_413(
    krmc: Facility, bob_token: str, settings: Any
) -> None:
    settings.RELAY_JSON_MAX_BYTES = 1000
    client = Client(raise_request_exception=False)
    body = json.dumps({"facility": "krmc", "sop_instance_uids": ["1.2.3"] * 500})
    response = client.post(
        "/api/v1/instances/known",
        body,
        "application/json",
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code == 413
    assert "limit" in response.json()["reason"]


def _without_url_guard(settings: Any) -> None:
    """Take relay.limits' URL guard out, to show the view itself answers cleanly."""
    settings.MIDDLEWARE = [
        name for name in settings.MIDDLEWARE if name != "relay.limits.HostileRequestMiddleware"
    ]


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize(
    "query", ["q=%00", "modality=%00", "q=a%00b", "from=%00", "page=%00", "sort=%00"]
)
def test_the_worklist_answers_a_nul_in_its_search(
    query: str, guard: bool, bob: User, caplog: Any, settings: Any
) -> None:
    if not guard:
        _without_url_guard(settings)
    client = client_for(bob)
    client.raise_request_exception = False
    response = client.get(f"/studies/?{query}")
    assert response.status_code == 400
    refusal = AuditEvent.objects.get(action=AuditAction.ACCESS_DENIED)
    assert "NUL" in refusal.detail["reason"]
    assert not _problems(caplog)


@pytest.mark.parametrize(
    "study", ["' OR 1=1--", "%00", "\x00", "1" * 40, "00000000-0000-0000-0000-00000000000"]
)
@pytest.mark.parametrize("guard", [True, False])
def test_the_share_form_answers_404_to_an_invalid_study_id(
    study: str, guard: bool, bob: User, caplog: Any, settings: Any
) -> None:
    if not guard:
        _without_url_guard(settings)
    client = client_for(bob)
    client.raise_request_exception = False
    # With relay.limits a raw NUL never reaches the view (400); the rest are 404.
    expected = 400 if "\x00" in study and guard else 404
    response = client.get("/share/", {"study": study})
    assert response.status_code == expected
    posted = client.post("/share/", {"study": study})
    assert posted.status_code == 404
    assert not _problems(caplog)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/instances/known", {"facility": "krmc\x00", "sop_instance_uids": ["1.2\x00"]}),
        ("/api/v1/instances/known", {"facility": "krmc", "sop_instance_uids": ["1.2\x00"]}),
        ("/api/v1/manifests", {"facility": "krmc\x00", "instances": []}),
        (
            "/api/v1/manifests",
            {"facility": "krmc", "instances": [{"sop_instance_uid": "1.2\x00", "sha256": "\x00"}]},
        ),
    ],
)
def test_a_nul_inside_a_json_body_is_answered_cleanly(
    path: str, body: dict[str, Any], krmc: Facility, bob_token: str, caplog: Any
) -> None:
    response = Client(raise_request_exception=False).post(
        path, body, "application/json", HTTP_AUTHORIZATION=f"Bearer {bob_token}"
    )
    assert response.status_code in (200, 400, 403)
    assert not _problems(caplog)


@pytest.mark.parametrize("name", ["a\x00b.dcm", "%00.dcm", "a%00b.dcm", "\x07bell.dcm"])
def test_a_control_character_in_x_filename_is_a_400_and_audited(
    name: str, krmc: Facility, bob: User, bob_token: str, caplog: Any
) -> None:
    response = upload(
        Client(raise_request_exception=False), dicom_bytes(), token=bob_token, filename=name
    )
    assert response.status_code == 400
    # A raw NUL is refused by relay.limits before the view, an encoded one by the view.
    reason = "NUL" if "\x00" in name else "X-Filename"
    assert reason in response.json()["reason"]
    refusals = AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED)
    assert any(reason in event.detail.get("reason", "") for event in refusals)
    assert not AuditEvent.objects.filter(action=AuditAction.UPLOAD).exists()
    assert not _problems(caplog)


# --- limits before a view reads anything (relay/limits.py) ---------------------------------------


class _ReadCounter:
    """Counts the bytes read from request bodies (Django's LimitedStream over wsgi.input)."""

    def __init__(self, monkeypatch: Any) -> None:
        from django.core.handlers import wsgi

        self.bytes = 0
        original = wsgi.LimitedStream.read

        def read(stream: Any, size: int = -1, /) -> bytes:
            data = original(stream, size)
            self.bytes += len(data)
            return data

        monkeypatch.setattr(wsgi.LimitedStream, "read", read)


def _multipart(size: int) -> tuple[bytes, str]:
    boundary = "hostileboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="login"\r\n\r\nx\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="f"; filename="a.bin"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + b"\0" * size
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/accounts/login/", "/accounts/password/reset/", "/p/x/"])
def test_an_anonymous_large_post_is_refused_before_a_byte_is_read(
    path: str, monkeypatch: Any, caplog: Any
) -> None:
    # 5 MB: over FILE_UPLOAD_MAX_MEMORY_SIZE, so before the limit it went to a temporary file.
    body, content_type = _multipart(5 * 1024 * 1024)
    reads = _ReadCounter(monkeypatch)
    response = Client(raise_request_exception=False).generic(
        "POST", path, body, content_type=content_type
    )
    assert response.status_code == 413
    assert reads.bytes == 0
    event = AuditEvent.objects.get(action=AuditAction.ACCESS_DENIED)
    assert event.detail["path"] == path
    assert "not signed in" in event.detail["reason"]
    assert not _problems(caplog)


@pytest.mark.django_db
def test_an_anonymous_sign_in_still_works(krmc: Facility, bob: User) -> None:
    from tests.helpers import PASSWORD

    response = Client().post("/accounts/login/", {"login": bob.email, "password": PASSWORD})
    assert response.status_code == 302


def test_a_signed_in_member_may_send_more_than_the_anonymous_limit(
    bob: User, settings: Any
) -> None:
    settings.RELAY_ANONYMOUS_BODY_BYTES = 1000
    client = client_for(bob)
    body, content_type = _multipart(200 * 1024)
    response = client.generic("POST", "/accounts/login/", body, content_type=content_type)
    assert response.status_code != 413


@pytest.mark.parametrize("token", ["", "rly_wrong"])
def test_the_upload_api_checks_its_token_before_reading_the_body(
    token: str, krmc: Facility, bob: User, monkeypatch: Any
) -> None:
    reads = _ReadCounter(monkeypatch)
    headers: dict[str, Any] = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    form, form_type = _multipart(5 * 1024 * 1024)
    for content_type, body in [("application/dicom", dicom_bytes()), (form_type, form)]:
        response = Client().generic(
            "POST", "/api/v1/instances?facility=krmc", body, content_type=content_type, **headers
        )
        assert response.status_code in (401, 413)
    assert reads.bytes == 0


def test_the_upload_api_with_a_good_token_takes_more_than_the_anonymous_limit(
    krmc: Facility, bob: User, bob_token: str, settings: Any
) -> None:
    settings.RELAY_ANONYMOUS_BODY_BYTES = 1000
    response = upload(Client(), dicom_bytes(), token=bob_token)
    assert response.status_code == 201


@pytest.mark.django_db
@pytest.mark.parametrize(
    "headers",
    [
        {"HTTP_COOKIE": "sessionid=abcdefgh\x00ijk"},
        {"HTTP_USER_AGENT": "Mozilla\x00"},
        {"HTTP_X_FORWARDED_FOR": "\x00"},
    ],
)
@pytest.mark.parametrize("path", ["/studies/", "/accounts/login/", "/p/x/"])
def test_a_nul_in_a_header_is_a_400(path: str, headers: dict[str, Any], caplog: Any) -> None:
    response = Client(raise_request_exception=False).get(path, **headers)
    assert response.status_code == 400
    assert AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED).count() == 1
    assert not _problems(caplog)


@pytest.mark.django_db
def test_a_url_over_the_limit_is_a_414(caplog: Any) -> None:
    response = Client(raise_request_exception=False).get("/studies/", {"q": "A" * 10_000})
    assert response.status_code == 414
    assert not _problems(caplog)


def test_a_nul_in_a_multipart_file_name_is_answered_cleanly(
    krmc: Facility, bob_token: str, caplog: Any
) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    named = SimpleUploadedFile("a\x00b.dcm", dicom_bytes(), "application/dicom")
    response = Client(raise_request_exception=False).post(
        "/api/v1/instances?facility=krmc", {"file": named}, HTTP_AUTHORIZATION=f"Bearer {bob_token}"
    )
    # Django's multipart parser drops the NUL from the name.
    assert response.status_code == 200
    assert response.json()["results"][0]["filename"] == "ab.dcm"
    assert not _problems(caplog)
