"""`relay send`: the desktop uploader against a live Relay server, with real DICOM files.

Personas: dana is a sender at North Valley Hospital; erin sends for North Valley and for Glacier
Clinic, so she has to say which. The image store is a private folder per test (the autouse
`_private_storage` fixture in tests/conftest.py).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import pytest
from django.db import connection as db_connection
from django.utils import timezone
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from portal.models import ApiToken, AuditEvent, Facility, Membership, User
from relay_client.cli import main
from transfers.models import Instance, Study

pytestmark = pytest.mark.django_db(transaction=True)  # the live server sees only committed rows

RELAY = Path(sys.executable).with_name("relay")
SENT_FILES = ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm")


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_relay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own RELAY_TOKEN / RELAY_SERVER must not leak into the tests.
    monkeypatch.delenv("RELAY_TOKEN", raising=False)
    monkeypatch.delenv("RELAY_SERVER", raising=False)


@pytest.fixture
def nvh(transactional_db: None) -> Facility:
    return Facility.objects.create(name="North Valley Hospital", slug="nvh", city="Whitefish")


@pytest.fixture
def glacier(transactional_db: None) -> Facility:
    return Facility.objects.create(name="Glacier Clinic", slug="glacier", city="Kalispell")


@pytest.fixture
def dana_token(nvh: Facility) -> str:
    dana = User.objects.create_user(email="dana@nvh.example", password="x" * 20)
    Membership.objects.create(user=dana, facility=nvh, role="sender")
    return ApiToken.issue(user=dana, name="CD station")[1]


@pytest.fixture
def erin_token(nvh: Facility, glacier: Facility) -> str:
    erin = User.objects.create_user(email="erin@glacier.example", password="x" * 20)
    Membership.objects.create(user=erin, facility=nvh, role="sender")
    Membership.objects.create(user=erin, facility=glacier, role="admin")
    return ApiToken.issue(user=erin, name="laptop")[1]


@pytest.fixture
def study_folder(tmp_path: Path) -> Path:
    """Three DICOM files in subfolders (one with a non-ASCII, spaced name) and a text file."""
    folder = tmp_path / "study"
    for subfolder, name in zip(("Röntgen CT", "MR", "reports"), SENT_FILES, strict=True):
        (folder / subfolder).mkdir(parents=True)
        shutil.copy(get_testdata_file(name), folder / subfolder / name)
    (folder / "README.txt").write_text("Burned by the CD robot on the 3rd floor.\n")
    return folder


def _dataset(name: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.fixture
def patient_cd(tmp_path: Path) -> tuple[Path, set[str]]:
    """A patient CD as Linux mounts one: a DICOMDIR and lower-cased names, plus a viewer
    folder with a DICOM file the DICOMDIR does not list (and so must not be sent)."""
    staging = tmp_path / "staging"
    fileset = FileSet()
    datasets = [_dataset("CT_small.dcm"), _dataset("CT_small.dcm"), _dataset("MR_small.dcm")]
    for ds in datasets:
        fileset.add(ds)
    fileset.write(staging)
    cd = tmp_path / "cdrom"
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = cd / path.relative_to(staging).as_posix().lower()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    (cd / "viewer").mkdir()
    shutil.copy(get_testdata_file("test-SR.dcm"), cd / "viewer" / "sample.dcm")
    (cd / "autorun.inf").write_text("[autorun]\nopen=viewer.exe\n")
    return cd, {str(ds.SOPInstanceUID) for ds in datasets}


# --- helpers ------------------------------------------------------------------------------------


def relay_send(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `relay send ...` in this process; the live server answers from its own thread."""
    code = main(["send", *args, "--retry-wait", "0"])
    out, err = capsys.readouterr()
    return code, out, err


def summary(out: str) -> dict[str, int]:
    return {
        label: int(count) for label, count in re.findall(r"^  (\S.*?) +(\d+)$", out, re.MULTILINE)
    }


def uploads_audited() -> int:
    return AuditEvent.objects.filter(action="upload").count()


# --- sending and resuming -----------------------------------------------------------------------


def test_it_sends_a_folder_and_a_second_run_sends_nothing(
    live_server, dana_token, nvh, study_folder, capsys
):
    # The installed console script, configured from the environment as on a facility PC.
    env = {**os.environ, "RELAY_SERVER": live_server.url, "RELAY_TOKEN": dana_token}
    first = subprocess.run(
        [str(RELAY), "send", str(study_folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert summary(first.stdout) == {
        "stored": 3,
        "already on server": 0,
        "duplicate": 0,
        "conflict": 0,
        "rejected": 0,
        "skipped": 1,
        "failed": 0,
        "complete studies": 3,
    }
    # The file left out is named, with the reason.
    assert "Skipped:\n  README.txt: not a DICOM file (no DICM marker)\n" in first.stdout
    # The manifest at the end marked the three studies complete.
    assert set(Study.objects.values_list("status", flat=True)) == {"complete"}
    assert "nvh (North Valley Hospital)" in first.stdout
    assert "Every DICOM file is on the server." in first.stdout
    stored = Instance.objects.filter(facility=nvh)
    assert {i.sop_instance_uid for i in stored} == {
        pydicom.dcmread(get_testdata_file(name)).SOPInstanceUID for name in SENT_FILES
    }
    # X-Filename carries the relative path, quoted on the way and unquoted by the server.
    filenames = set(
        AuditEvent.objects.filter(action="upload").values_list("detail__filename", flat=True)
    )
    assert filenames == {"Röntgen CT/CT_small.dcm", "MR/MR_small.dcm", "reports/test-SR.dcm"}
    # The text file was never sent: the server saw exactly three uploads.
    assert uploads_audited() == 3

    code, out, _ = relay_send(
        capsys, str(study_folder), "--server", live_server.url, "--token", dana_token
    )
    assert code == 0
    counts = summary(out)
    assert (counts["stored"], counts["already on server"], counts["skipped"]) == (
        0,
        3,
        1,
    )
    assert Instance.objects.count() == 3
    assert uploads_audited() == 3  # not sent again, not merely deduplicated by the server


def test_it_sends_only_what_the_dicomdir_lists(live_server, dana_token, patient_cd, capsys):
    cd, listed_uids = patient_cd
    code, out, err = relay_send(capsys, str(cd), "--server", live_server.url, "--token", dana_token)
    assert code == 0, out + err
    assert summary(out)["stored"] == 3
    assert set(Instance.objects.values_list("sop_instance_uid", flat=True)) == listed_uids
    # Neither the DICOMDIR, nor the unlisted viewer sample, nor autorun.inf reached the server.
    assert uploads_audited() == 3
    assert summary(out)["skipped"] == 0
    # The DICOMDIR is counted and named: an index, which the server would refuse, not sent.
    assert summary(out)["DICOMDIR (index, not sent)"] == 1
    assert re.search(r"^DICOMDIR \(the index of a disc.*\):\n  dicomdir\n", out, re.MULTILINE)


def test_it_reports_files_the_dicomdir_lists_but_the_disc_lacks(
    live_server, dana_token, patient_cd, capsys
):
    cd, _ = patient_cd
    image = next(p for p in sorted(cd.rglob("im*")) if p.is_file())
    image.unlink()
    code, out, _ = relay_send(capsys, str(cd), "--server", live_server.url, "--token", dana_token)
    assert code == 1
    assert summary(out)["stored"] == 2
    assert summary(out)["failed"] == 1
    assert "Listed in the DICOMDIR but not on the disc." in out


def test_it_lists_rejected_and_conflicting_files_with_their_reasons(
    live_server, dana_token, tmp_path, capsys
):
    folder = tmp_path / "mixed"
    folder.mkdir()
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (folder / "cut.dcm").write_bytes(data[:-2000])  # a CD read error, say
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "a.dcm")
    # Same SOP Instance UID as a.dcm, other content: only one of the two can be kept.
    changed = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    changed.PatientName = "Other^Patient"
    changed.save_as(folder / "b.dcm")

    code, out, _ = relay_send(
        capsys, str(folder), "--server", live_server.url, "--token", dana_token
    )

    assert code == 1
    counts = summary(out)
    assert (counts["stored"], counts["conflict"], counts["rejected"]) == (1, 1, 1)
    assert re.search(r"^  cut\.dcm: .*\(the file is truncated\)", out, re.MULTILINE)
    assert "already stored with different content" in out
    assert Instance.objects.count() == 1


# --- refusals: the run stops with the reason ----------------------------------------------------


def test_it_stops_at_once_on_a_bad_token(live_server, nvh, study_folder, capsys):
    code, out, err = relay_send(
        capsys, str(study_folder), "--server", live_server.url, "--token", "rly_notarealtoken"
    )
    assert code == 4  # refused
    assert "The API token is not valid (unknown)." in err
    assert "--token or RELAY_TOKEN" in err
    assert Instance.objects.count() == 0
    assert uploads_audited() == 0


def test_it_stops_at_once_when_the_token_is_revoked_mid_run(
    start_proxy, dana_token, study_folder, capsys
):
    def revoke() -> None:
        # Someone revokes the token on the account page while the CD is being sent.
        ApiToken.objects.update(revoked_at=timezone.now())
        db_connection.close()  # this runs in a proxy thread with its own connection

    proxy = start_proxy(before_upload=revoke)
    code, out, err = relay_send(
        capsys, str(study_folder), "--server", proxy.url, "--token", dana_token, "--jobs", "1"
    )
    assert code == 4  # refused
    assert "The API token is not valid (revoked)." in err
    assert [status for _, status in proxy.uploads] == [401]  # not one request per file
    assert Instance.objects.count() == 0


def test_a_sender_for_two_facilities_gets_the_servers_question(
    live_server, erin_token, glacier, study_folder, capsys
):
    code, _, err = relay_send(
        capsys, str(study_folder), "--server", live_server.url, "--token", erin_token
    )
    assert code == 2  # a usage error: --facility is needed
    assert "Say which facility to upload to (?facility=...): one of " in err
    assert Instance.objects.count() == 0

    code, out, _ = relay_send(
        capsys,
        str(study_folder),
        "--server",
        live_server.url,
        "--token",
        erin_token,
        "--facility",
        "glacier",
    )
    assert code == 0
    assert summary(out)["stored"] == 3
    assert set(Instance.objects.values_list("facility__slug", flat=True)) == {"glacier"}


def test_it_refuses_a_facility_the_token_cannot_upload_to(
    live_server, dana_token, glacier, study_folder, capsys
):
    code, _, err = relay_send(
        capsys,
        str(study_folder),
        "--server",
        live_server.url,
        "--token",
        dana_token,
        "--facility",
        "glacier",
    )
    assert code == 4  # refused
    assert (
        "You cannot upload to a facility 'glacier'. With this token you can upload to: nvh." in err
    )
    assert uploads_audited() == 0


# --- retries ------------------------------------------------------------------------------------


STORE_DOWN = json.dumps(
    {
        "status": "rejected",
        "reason": "The image store is unavailable; nothing was stored. Try again shortly.",
    }
).encode()


class FlakyProxy(ThreadingHTTPServer):
    """A loopback proxy in front of the live server. After `succeed_first` uploads have gone
    through, it answers the next `failures` uploads (every request, if not `only_uploads`)
    with `answer`: by default the 503 Relay itself answers while the image store is
    unavailable. Everything else goes through, after `before_upload()` has run for an upload.

    `wave`: the first failing uploads are held until that many have arrived, so that a test
    knows they were all on their way at once (the threads of a run sending in parallel).
    `bad_file`: uploads of this X-Filename always get `answer`, and the others wait until it
    has been answered once (a file the server fails on, whatever the others do)."""

    daemon_threads = True

    def __init__(
        self,
        upstream: str,
        *,
        failures: int = 0,
        succeed_first: int = 0,
        answer: tuple[int, dict[str, str], bytes] | None = None,
        only_uploads: bool = True,
        wave: int = 0,
        bad_file: str | None = None,
        before_upload: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "localhost", parts.port or 80)
        self.failures = failures
        self.succeed_first = succeed_first
        self.answer = answer or (503, {"Content-Type": "application/json"}, STORE_DOWN)
        self.only_uploads = only_uploads
        self.wave = threading.Barrier(wave, timeout=20) if wave > 1 else None
        self.bad_file = bad_file
        self.bad_file_answered = threading.Event()
        self.before_upload = before_upload
        self.lock = threading.Lock()
        self.uploads: list[tuple[dict[str, str], int]] = []  # (request headers, status answered)
        self.requests: list[tuple[str, int]] = []  # (path, status answered), every request
        self.ticks = 0  # counts beginnings and ends of uploads, to tell which overlapped
        self.after_wave: list[tuple[int, int, int]] = []  # (began, ended, status) of later uploads
        self.wave_passed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def tick(self) -> int:
        with self.lock:
            self.ticks += 1
            return self.ticks

    def take_failure(self) -> bool:
        with self.lock:
            if self.succeed_first > 0:
                self.succeed_first -= 1
                return False
            if self.failures > 0:
                self.failures -= 1
                return True
            return False

    def hold_wave(self) -> bool:
        """The first failing uploads wait here until the whole wave has arrived. True for an
        upload of the wave."""
        if self.wave is None or self.wave_passed:
            return False
        try:
            self.wave.wait()
        except threading.BrokenBarrierError:
            pass
        self.wave_passed = True  # by each of the wave, before it answers
        return True

    def failed_one_at_a_time(self) -> bool:
        """Did the failing uploads after the wave go one at a time, none overlapping another?"""
        failing = sorted((b, e) for b, e, status in self.after_wave if status >= 500)
        return all(e1 < b2 for (_, e1), (b2, _) in zip(failing, failing[1:], strict=False))


class _ProxyHandler(BaseHTTPRequestHandler):
    server: FlakyProxy

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upload = urlsplit(self.path).path == "/api/v1/instances"
        began = self.server.tick()
        in_wave = False
        headers: dict[str, str]
        bad = upload and self.headers.get("X-Filename") == self.server.bad_file
        if upload and self.server.bad_file and not bad:
            self.server.bad_file_answered.wait(timeout=20)
        if bad or (upload or not self.server.only_uploads) and self.server.take_failure():
            if upload:
                in_wave = self.server.hold_wave()
            status, headers, data = self.server.answer
        else:
            if upload and self.server.before_upload is not None:
                self.server.before_upload()
            connection = http.client.HTTPConnection(*self.server.upstream, timeout=60)
            forwarded = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
            }
            connection.request(self.command, self.path, body=body, headers=forwarded)
            response = connection.getresponse()
            status, data = response.status, response.read()
            headers = {"Content-Type": response.getheader("Content-Type", "application/json")}
            connection.close()
        # Recorded before the answer leaves: the client hears of it only afterwards.
        ended = self.server.tick()
        with self.server.lock:
            self.server.requests.append((urlsplit(self.path).path, status))
            if upload:
                self.server.uploads.append(
                    ({k.lower(): v for k, v in self.headers.items()}, status)
                )
                if self.server.wave is not None and not in_wave:
                    self.server.after_wave.append((began, ended, status))
        if bad:
            self.server.bad_file_answered.set()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def start_proxy(live_server) -> Iterator[Callable[..., FlakyProxy]]:
    started: list[tuple[FlakyProxy, threading.Thread]] = []

    def start(**options: Any) -> FlakyProxy:
        proxy = FlakyProxy(live_server.url, **options)
        thread = threading.Thread(target=proxy.serve_forever, daemon=True)
        thread.start()
        started.append((proxy, thread))
        return proxy

    yield start
    for proxy, thread in started:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)


def test_it_retries_while_the_image_store_is_unavailable(
    start_proxy, dana_token, study_folder, capsys
):
    flaky_proxy = start_proxy(failures=2)
    code, out, err = relay_send(
        capsys, str(study_folder), "--server", flaky_proxy.url, "--token", dana_token, "--jobs", "1"
    )
    assert code == 0, out + err
    assert summary(out)["stored"] == 3
    assert Instance.objects.count() == 3
    statuses = [status for _, status in flaky_proxy.uploads]
    assert statuses == [503, 503, 201, 201, 201]
    # The body went with an explicit length, never chunked (the Django dev server cannot read that).
    for headers, _ in flaky_proxy.uploads:
        assert "transfer-encoding" not in headers
        assert headers["content-type"] == "application/dicom"
        assert headers["authorization"] == f"Bearer {dana_token}"
    sizes = sorted(int(h["content-length"]) for h, status in flaky_proxy.uploads if status == 201)
    assert sizes == sorted(Path(get_testdata_file(name)).stat().st_size for name in SENT_FILES)


def test_a_server_down_for_good_stops_the_run_after_its_retries(
    start_proxy, dana_token, study_folder, capsys
):
    # On main each file retried on its own (three files, three attempts each: 9 uploads) and
    # the run ended with exit code 1 as if the files were at fault.
    flaky_proxy = start_proxy(failures=1_000)
    code, out, err = relay_send(
        capsys, str(study_folder), "--server", flaky_proxy.url, "--token", dana_token,
        "--retries", "2", "--jobs", "1",
    )  # fmt: skip
    assert code == 3
    assert len(flaky_proxy.uploads) == 3  # one attempt and two retries for the whole run
    assert summary(out)["not sent"] == 3
    assert summary(out)["failed"] == 0
    assert "The run stopped before 3 files went" in out
    assert (
        f"relay: {flaky_proxy.url} is unavailable: HTTP 503 Service Unavailable: The image "
        "store is unavailable; nothing was stored. Try again shortly. Gave up after 3 attempts"
    ) in err
    assert "run the same command again later" in err
    assert Instance.objects.count() == 0


def test_it_stops_when_the_server_cannot_be_reached(dana_token, study_folder, capsys):
    # A bound socket that does not listen: connections are refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        code, _, err = relay_send(
            capsys,
            str(study_folder),
            "--server",
            f"http://127.0.0.1:{port}",
            "--token",
            dana_token,
            "--retries",
            "2",
        )
    assert code == 3
    assert (
        f"relay: http://127.0.0.1:{port} is unavailable: the connection was refused (is the "
        "server running?). Gave up after 3 attempts"
    ) in err
    # One shared backoff: each wait is announced once, with the attempt it leads to.
    assert err.count("Trying again in 0 s") == 2
    assert "(attempt 3 of 3)" in err


def test_other_bytes_under_a_stored_uid_are_not_already_on_the_server(
    live_server, nvh, dana_token, tmp_path, capsys
):
    # The first send stores a CT; a folder then holds a different copy under the same UID (an
    # edited or damaged file). On main it printed "already on server" and exited 0.
    first = tmp_path / "first"
    first.mkdir()
    ds = _dataset("CT_small.dcm")
    ds.save_as(first / "ct.dcm", enforce_file_format=True)
    code, _, _ = relay_send(capsys, str(first), "--server", live_server.url, "--token", dana_token)
    assert code == 0
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(first / "ct.dcm", again / "same.dcm")
    ds.PatientName = "OTHER^PATIENT"
    ds.save_as(again / "edited.dcm", enforce_file_format=True)
    code, out, _ = relay_send(
        capsys, str(again), "--server", live_server.url, "--token", dana_token
    )
    counts = summary(out)
    assert counts["already on server"] == 1  # the same bytes
    assert counts["conflict"] == 1  # other bytes under that UID: sent, refused, listed
    assert code == 1
    assert "Every DICOM file is on the server" not in out
