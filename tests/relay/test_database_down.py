"""Database down: every page answers 503 with Retry-After (a maintenance page on the site, JSON
under /api/ that the uploader waits on and retries), and the log gets one line per request, no
traceback. Relay runs under gunicorn in a child process whose DATABASE_URL is unreachable:
PostgreSQL on a closed port, and an SQLite file in a folder that does not exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.db import OperationalError
from django.test import RequestFactory

from relay.unavailable import ServiceUnavailableMiddleware
from tests.helpers import dicom_bytes
from tests.server_process import free_port, relay_server

TOKEN = "rly_" + "x" * 40


@pytest.fixture(
    params=["postgresql", "sqlite"],
)
def down_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return f"postgres://postgres@127.0.0.1:{free_port()}/relay"
    return f"sqlite:///{tmp_path / 'no-such-folder' / 'relay.sqlite3'}"


def test_it_answers_503_on_every_page_when_the_database_is_down(
    tmp_path: Path, down_database_url: str
) -> None:
    with relay_server(tmp_path, database_url=down_database_url) as server:
        pages = {
            "sign-in": server.request("GET", "/accounts/login/"),
            "sign-in form sent": server.request(
                "POST", "/accounts/login/", b"login=a%40b.example&password=x",
                {"Content-Type": "application/x-www-form-urlencoded"},
            ),
            "worklist": server.request("GET", "/studies/"),
        }  # fmt: skip
        api = {
            "upload": server.request(
                "POST", "/api/v1/instances?facility=krmc", dicom_bytes(),
                {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/dicom"},
            ),
            "known instances": server.request(
                "POST", "/api/v1/instances/known",
                json.dumps({"facility": "krmc", "sop_instance_uids": ["1.2.3"]}).encode(),
                {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            ),
            "facilities": server.request("GET", "/api/v1/facilities"),
        }  # fmt: skip
        static = server.request("GET", "/static/css/relay.css")
        # A hostile request is refused all the same; its refusal goes to the log instead.
        hostile = server.request("GET", "/studies/?q=%00")
    for name, answer in pages.items():
        assert answer.status == 503, name
        assert answer.headers["Retry-After"] == "30", name
        assert answer.headers["Content-Type"].startswith("text/html"), name
        page = answer.body.decode()
        assert "Relay is unavailable for a moment" in page, name
        assert "database is unavailable" in page, name
        assert answer.headers["Cache-Control"] == "no-store", name
    for name, answer in api.items():
        assert answer.status == 503, name
        assert answer.headers["Retry-After"] == "30", name
        assert answer.headers["Content-Type"] == "application/json", name
        assert json.loads(answer.body) == {
            "status": "unavailable",
            "reason": "Relay's database is unavailable; nothing was done. Try again shortly.",
        }, name
    # The maintenance page's style sheet needs no database.
    assert static.status == 200
    log = server.log.read_text()
    assert "Traceback" not in log
    assert hostile.status == 400
    errors = [line for line in log.splitlines() if " ERROR " in line]
    refusals = [e for e in errors if "could not audit a refused request" in e]
    assert len(refusals) == 1
    errors.remove(refusals[0])
    assert len(errors) == len(pages) + len(api)
    assert all("relay.unavailable database unavailable: OperationalError" in e for e in errors)


def test_it_answers_503_when_the_database_fails_during_a_view() -> None:
    """The database went away after the request began: the view's error becomes the same 503."""
    middleware = ServiceUnavailableMiddleware(lambda request: None)  # type: ignore[arg-type,return-value]
    factory = RequestFactory()
    error = OperationalError("server closed the connection unexpectedly")
    api = middleware.process_exception(factory.post("/api/v1/manifests"), error)
    page = middleware.process_exception(factory.get("/studies/"), error)
    assert api is not None and page is not None
    assert (api.status_code, api["Retry-After"], api["Content-Type"]) == (
        503, "30", "application/json",
    )  # fmt: skip
    assert (page.status_code, page["Retry-After"]) == (503, "30")
    assert b"Relay is unavailable for a moment" in page.content
    assert middleware.process_exception(factory.get("/studies/"), ValueError("x")) is None
