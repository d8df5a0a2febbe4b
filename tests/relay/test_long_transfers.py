"""A transfer that takes longer than gunicorn's worker timeout is not cut (issue 18).

Found by the operator run on main: under `gunicorn relay.wsgi:application` (30 s timeout, sync
workers), a ZIP read at 300 KB/s was cut at 30 s ("WORKER TIMEOUT", 21,021,889 of 21,052,037
bytes) and an 8 MB upload at 200 KB/s got a 500 after 30.4 s, while the README promises 2 GiB
uploads. Under relay/gunicorn_conf.py a worker keeps telling the master it is alive while a
request runs, however long. The test runs gunicorn as configured with the timeout lowered to
3 s, and moves a download and an upload that each take about 8 s.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.helpers import dicom_bytes
from tests.server_process import relay_run, relay_server

# Above gunicorn's own 2 s linger when it closes a connection (on the worker's main thread).
TIMEOUT_S = 3
SETUP = r"""
import django

django.setup()
from portal.models import ApiToken, Facility, Membership, Role, User

facility = Facility.objects.create(name="Slow Line Clinic", slug="slow")
user = User.objects.create_user(email="slow@example.org", password="a long passphrase 1")
Membership.objects.create(user=user, facility=facility, role=Role.SENDER)
print("TOKEN " + ApiToken.issue(user=user, name="slow")[1])
"""


@pytest.fixture
def server(tmp_path: Path):
    database = f"sqlite:///{tmp_path / 'relay.sqlite3'}"  # a database of the test's own
    relay_run(tmp_path, ["manage.py", "migrate", "--verbosity", "0"], database_url=database)
    out = relay_run(tmp_path, ["-c", SETUP], database_url=database)
    token = next(ln for ln in out.splitlines() if ln.startswith("TOKEN ")).split()[1]
    with relay_server(
        tmp_path,
        database_url=database,
        env={"CELERY_TASK_ALWAYS_EAGER": "1"},  # no worker here: the upload's tasks run inline
        args=("--timeout", str(TIMEOUT_S)),
    ) as running:
        yield int(running.url.rsplit(":", 1)[1]), token, running.log


def _request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head)
    return sock


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_slow_upload_longer_than_the_worker_timeout_is_stored(server) -> None:
    port, token, log = server
    body = dicom_bytes()
    head = (
        f"POST /api/v1/instances?facility=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/dicom\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock = _request(port, head)
    pieces = 10
    step = len(body) // pieces + 1
    started = time.monotonic()
    for n in range(0, len(body), step):
        sock.sendall(body[n : n + step])
        time.sleep((TIMEOUT_S * 2.5) / pieces)  # about 7.5 s in all
    status, answer = _answer(sock)
    assert time.monotonic() - started > TIMEOUT_S * 2
    assert status == 201, (answer[:500], log.read_text()[-2000:])
    assert b"WORKER TIMEOUT" not in log.read_bytes()


def _dechunked(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body put back together; a cut one raises."""
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        assert len(body) >= size + 2, "the answer was cut"
        out, body = out + body[:size], body[size + 2 :]


def _big_instance() -> tuple[bytes, str]:
    """An 8 MiB CT image (2048 x 2048, 16-bit): more than the sockets' buffers hold, so the
    server waits on the reader; and its Study Instance UID."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    ds.StudyInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 2048
    ds.PixelData = bytes(range(256)) * (2048 * 2048 * 2 // 256)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), str(ds.StudyInstanceUID)


def test_a_slow_download_longer_than_the_worker_timeout_is_read_to_the_end(server) -> None:
    port, token, log = server
    data, study_uid = _big_instance()
    stored = _request(
        port,
        (
            f"POST /api/v1/instances?facility=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/dicom\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + data,
    )
    assert _answer(stored)[0] == 201

    # WADO-RS of the study, read 64 KiB every 60 ms (about 1 MB/s: some 8 s for 8 MiB).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /dicom-web/studies/{study_uid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f'Authorization: Bearer {token}\r\nAccept: multipart/related; type="application/dicom"'
            f"\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    started = time.monotonic()
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
        time.sleep(0.06)
    took = time.monotonic() - started
    sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunked(body)
    assert data[132:] in body  # the whole instance, to its last byte
    assert took > TIMEOUT_S * 2, f"read in {took:.1f} s: too fast to prove anything"
    assert b"WORKER TIMEOUT" not in log.read_bytes()
