"""`relay send` while the server is down or unavailable (issue 13, findings 4 and 9).

The whole run backs off once, however many upload threads it has: the threads that were on their
way when the outage began add no wait of their own, one request at a time tries again, and the
server's Retry-After is honoured. An error page (a 500 from a server whose database is down, a
proxy's 502/503) is the server's state, retried like a 503, not "not a Relay answer". After
--retries attempts or --max-wait seconds the run stops with exit code 3 and says what the server
answered. The wait is 0 s here (--retry-wait 0, Retry-After: 0), so the tests count requests,
never time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.helpers import dicom_bytes
from tests.relay_client import test_relay_send as base
from tests.relay_client.test_relay_send import relay_send, summary
from transfers.completion import expected_outstanding
from transfers.models import Instance

# The live-server fixtures of the `relay send` tests.
start_proxy = base.start_proxy
dana_token = base.dana_token
nvh = base.nvh
study_folder = base.study_folder
_no_relay_environment = base._no_relay_environment

pytestmark = pytest.mark.django_db(transaction=True)  # the live server sees only committed rows

DATABASE_DOWN = "The database is unavailable; nothing was stored. Try again shortly."
ERROR_PAGE = b"<!doctype html><html><body><h1>Server Error (500)</h1></body></html>"
BAD_GATEWAY = (
    b"<html><body><center><h1>503 Service Temporarily Unavailable</h1></center></body></html>"
)


def json_503(reason: str, retry_after: int) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", "Retry-After": str(retry_after)}
    return 503, headers, json.dumps({"status": "error", "reason": reason}).encode()


@pytest.fixture
def eight_files(tmp_path: Path) -> Path:
    folder = tmp_path / "cd"
    folder.mkdir()
    for n in range(1, 9):
        (folder / f"IM{n}.dcm").write_bytes(dicom_bytes("CT_small.dcm", InstanceNumber=n))
    return folder


def test_an_outage_mid_upload_is_one_backoff_shared_by_the_threads(
    start_proxy, dana_token, eight_files, capsys
):
    # Four uploads are on their way at once when the image store fails; it stays down for two
    # more attempts. On main each of the four threads backed off on its own.
    proxy = start_proxy(failures=4 + 2, wave=4)
    code, out, err = relay_send(
        capsys, str(eight_files), "--server", proxy.url, "--token", dana_token,
        "--jobs", "4", "--retries", "3",
    )  # fmt: skip
    assert code == 0, out + err
    assert summary(out)["stored"] == 8
    assert Instance.objects.count() == 8
    statuses = [status for _, status in proxy.uploads]
    assert statuses == [503] * 6 + [201] * 8
    # The four failures of the first wave made one wait, and each retry during the outage went
    # alone: three waits in all, each announced once.
    assert err.count("Trying again in 0 s") == 3
    assert "(attempt 4 of 4)" in err
    assert proxy.failed_one_at_a_time()


def test_a_server_down_for_good_stops_after_one_backoff_not_one_per_file(
    start_proxy, dana_token, eight_files, capsys
):
    # A proxy in front of a stopped server answers an HTML page. On main: 8 files x 3 attempts
    # = 24 uploads, and exit code 1 with "not a Relay answer" for each file.
    answer = (503, {"Content-Type": "text/html"}, BAD_GATEWAY)
    proxy = start_proxy(failures=1_000, wave=4, answer=answer)
    code, out, err = relay_send(
        capsys, str(eight_files), "--server", proxy.url, "--token", dana_token,
        "--jobs", "4", "--retries", "2",
    )  # fmt: skip
    assert code == 3
    assert len(proxy.uploads) == 4 + 2  # the first wave, then two retries for the whole run
    assert proxy.failed_one_at_a_time()
    assert summary(out)["not sent"] == 8
    assert summary(out)["failed"] == 0
    assert (
        f"relay: {proxy.url} is unavailable: HTTP 503 Service Unavailable (an error page, not a "
        "Relay answer). Gave up after 3 attempts"
    ) in err
    assert Instance.objects.count() == 0
    # The files were announced before the outage: their studies wait for the next run.
    assert expected_outstanding().count() == 8


def test_a_file_the_server_fails_on_fails_alone_and_the_run_goes_on(
    start_proxy, dana_token, eight_files, capsys
):
    # The server answers its 500 page to one file only, and stores the others in between: not
    # an outage, so that file fails after its retries and the run does not stop for it.
    answer = (500, {"Content-Type": "text/html"}, ERROR_PAGE)
    proxy = start_proxy(bad_file="IM1.dcm", answer=answer)
    code, out, err = relay_send(
        capsys, str(eight_files), "--server", proxy.url, "--token", dana_token,
        "--jobs", "2", "--retries", "2",
    )  # fmt: skip
    assert code == 1, out + err
    assert (summary(out)["stored"], summary(out)["failed"]) == (7, 1)
    assert (
        "  IM1.dcm: HTTP 500 Internal Server Error (an error page, not a Relay answer) "
        "(after 3 attempts)"
    ) in out
    bad = [status for headers, status in proxy.uploads if headers["x-filename"] == "IM1.dcm"]
    assert bad == [500, 500, 500]


def test_a_database_down_error_page_is_retried_not_taken_for_a_foreign_server(
    start_proxy, dana_token, study_folder, capsys
):
    # A server whose database is down answers its 500 HTML page to everything. On main the run
    # stopped at once: "HTTP 500 Internal Server Error from ... (not a Relay answer)".
    answer = (500, {"Content-Type": "text/html"}, ERROR_PAGE)
    proxy = start_proxy(failures=2, only_uploads=False, answer=answer)
    code, out, err = relay_send(
        capsys, str(study_folder), "--server", proxy.url, "--token", dana_token
    )
    assert code == 0, out + err
    assert proxy.requests[:3] == [
        ("/api/v1/facilities", 500),
        ("/api/v1/facilities", 500),
        ("/api/v1/facilities", 200),
    ]
    assert "HTTP 500 Internal Server Error (an error page, not a Relay answer). Trying" in err
    assert summary(out)["stored"] == 3


def test_it_waits_as_long_as_the_servers_retry_after_asks(
    start_proxy, dana_token, study_folder, capsys
):
    proxy = start_proxy(failures=1, only_uploads=False, answer=json_503(DATABASE_DOWN, 1))
    code, out, err = relay_send(
        capsys, str(study_folder), "--server", proxy.url, "--token", dana_token
    )
    assert code == 0, out + err
    # --retry-wait is 0, the server asked for 1 s: the wait is the server's.
    assert (
        f"relay: {proxy.url} is unavailable: HTTP 503 Service Unavailable: The database is "
        "unavailable; nothing was stored. Try again shortly. Trying again in 1 s as the server "
        "asked (Retry-After) (attempt 2 of 7)."
    ) in err
    assert [path for path, _ in proxy.requests[:2]] == ["/api/v1/facilities"] * 2


def test_a_retry_after_beyond_max_wait_stops_the_run_at_once(
    start_proxy, dana_token, study_folder, capsys
):
    proxy = start_proxy(failures=1_000, only_uploads=False, answer=json_503(DATABASE_DOWN, 3600))
    code, out, err = relay_send(
        capsys, str(study_folder), "--server", proxy.url, "--token", dana_token,
        "--max-wait", "60",
    )  # fmt: skip
    assert code == 3
    assert proxy.requests == [("/api/v1/facilities", 503)]  # no hour-long wait, no retry
    assert (
        "The database is unavailable; nothing was stored. Try again shortly. The next wait, "
        "3600 s as the server asked (Retry-After), is more than the 60 s left of --max-wait. "
        "Gave up after 1 attempt"
    ) in err


def test_a_name_that_does_not_resolve_is_the_server_unreachable(dana_token, study_folder, capsys):
    code, _, err = relay_send(
        capsys, str(study_folder), "--server", "http://relay.invalid", "--token", dana_token,
        "--retries", "1",
    )  # fmt: skip
    assert code == 3
    assert (
        "relay: http://relay.invalid is unavailable: its name could not be resolved (DNS). "
        "Gave up after 2 attempts"
    ) in err


def test_the_files_stored_before_an_outage_are_not_sent_again(
    start_proxy, dana_token, tmp_path, capsys
):
    # Two uploads go through, then the server stops answering: the next run sends only the rest.
    folder = tmp_path / "study"
    folder.mkdir()
    for name in base.SENT_FILES:
        shutil.copy(get_testdata_file(name), folder / name)
    proxy = start_proxy(succeed_first=2, failures=1_000)
    code, out, _ = relay_send(
        capsys, str(folder), "--server", proxy.url, "--token", dana_token,
        "--jobs", "1", "--retries", "1",
    )  # fmt: skip
    assert code == 3
    assert (summary(out)["stored"], summary(out)["not sent"]) == (2, 1)
    proxy.failures = 0
    code, out, _ = relay_send(capsys, str(folder), "--server", proxy.url, "--token", dana_token)
    assert code == 0
    assert (summary(out)["stored"], summary(out)["already on server"]) == (1, 2)
    assert Instance.objects.count() == 3
