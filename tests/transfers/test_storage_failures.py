"""A disk that fails partway (a file size limit: RLIMIT_FSIZE, as EFBIG or a full disk would)
stores nothing and says so: 503 JSON with Retry-After, no object, no row, the refusal audited.

Relay runs under gunicorn in a child process with the limit set (the test process itself must
keep writing its database and logs), on this run's test database.
"""

from __future__ import annotations

import errno
import io
import json
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from django.core.files.base import ContentFile, File
from moto.server import ThreadedMotoServer

from portal.models import AuditAction, AuditEvent
from relay.s3 import AtomicS3Storage
from relay.storage import AtomicFileSystemStorage
from tests.helpers import dicom_bytes
from tests.server_process import Server, database_url_of_this_run, relay_server
from transfers.models import Instance

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024
FILE_SIZE_LIMIT = 16 * MiB


def _limit_file_size() -> None:
    # In the child only: no file it writes may grow past the limit (Python ignores SIGXFSZ,
    # so the write fails with EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.RLIM_INFINITY))


def _large_dicom() -> bytes:
    """A 24 MiB CT: 3 frames of 2048 x 2048 16-bit pixels."""
    return dicom_bytes(
        Rows=2048, Columns=2048, NumberOfFrames="3", PixelData=bytes(2048 * 2048 * 2 * 3)
    )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _send(server: Server, token: str, data: bytes) -> Any:
    return server.request(
        "POST", "/api/v1/instances?facility=krmc", data,
        {"Authorization": f"Bearer {token}", "Content-Type": "application/dicom",
         "X-Filename": "big.dcm"},
    )  # fmt: skip


@pytest.fixture
def limited_server(
    tmp_path: Path, bob_token: str, request: pytest.FixtureRequest
) -> Iterator[Server]:
    memory = request.param
    env = {
        "MEDIA_ROOT": str(tmp_path / "media"),
        "RELAY_UPLOAD_TEMP_DIR": str(tmp_path / "uploads"),
        "RELAY_UPLOAD_MEMORY_BYTES": str(memory),
    }
    (tmp_path / "uploads").mkdir()
    with relay_server(
        tmp_path, database_url=database_url_of_this_run(), env=env, preexec=_limit_file_size
    ) as server:
        yield server


# Uploads are held in memory up to 64 MiB, so the first file to outgrow the limit is the object.
@pytest.mark.parametrize("limited_server", [64 * MiB], indirect=True)
def test_it_stores_no_partial_object_when_the_storage_write_fails(
    limited_server: Server, bob_token: str, tmp_path: Path
) -> None:
    answer = _send(limited_server, bob_token, _large_dicom())
    assert _files(tmp_path / "media") == []  # no object, not even a hidden partial one
    assert not Instance.objects.exists()
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "30"
    body = json.loads(answer.body)
    assert body["status"] == "unavailable"
    assert (
        body["reason"] == "The image store is unavailable; nothing was stored. Try again shortly."
    )
    refusal = AuditEvent.objects.get(action=AuditAction.UPLOAD)
    assert refusal.detail["status"] == "unavailable"
    # A file under the limit is stored whole, as before.
    small = dicom_bytes()
    stored = _send(limited_server, bob_token, small)
    assert stored.status == 201, stored.body
    (obj,) = _files(tmp_path / "media")
    assert obj.stat().st_size == len(small)
    assert Instance.objects.get().storage_key.endswith(obj.name)
    # The operator is told why: the OS's own error.
    log = limited_server.log.read_text()
    assert "storage write failed" in log
    assert "[Errno 27] File too large" in log


# Uploads spill to a temporary file past 1 MiB: that file outgrows the limit first.
@pytest.mark.parametrize("limited_server", [1 * MiB], indirect=True)
def test_it_answers_503_when_the_temporary_disk_fails(
    limited_server: Server, bob_token: str, tmp_path: Path
) -> None:
    reason = (
        "The server could not write the upload to its temporary disk; nothing was stored. "
        "Try again shortly."
    )
    data = _large_dicom()
    answer = _send(limited_server, bob_token, data)
    assert (answer.status, answer.headers["Retry-After"]) == (503, "30")
    assert json.loads(answer.body)["reason"] == reason
    # The same file in a multipart form: Django spools it to FILE_UPLOAD_TEMP_DIR itself.
    boundary = "relay-test-boundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    multipart = limited_server.request(
        "POST", "/api/v1/instances?facility=krmc", form,
        {"Authorization": f"Bearer {bob_token}",
         "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert (multipart.status, multipart.headers["Retry-After"]) == (503, "30")
    assert json.loads(multipart.body) == {"status": "unavailable", "reason": reason}
    assert _files(tmp_path / "media") == []
    assert not Instance.objects.exists()
    log = limited_server.log.read_text()
    assert log.count("temporary file write failed") == 2
    assert "Traceback" not in log


def test_the_folder_storage_leaves_nothing_when_a_write_fails(tmp_path: Path) -> None:
    """The write itself fails partway with a real OSError (the file's content cannot be read
    past 3 MiB, as a spool on a failing disk would): no object, no temporary file."""

    class FailingAfter3MiB(ContentFile):
        def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
            yield bytes(3 * MiB)
            raise OSError(errno.EIO, "Input/output error")

    storage = AtomicFileSystemStorage(location=tmp_path / "media")
    with pytest.raises(OSError, match="Input/output"):
        storage.save("dicom/a/b.dcm", FailingAfter3MiB(b""))
    assert _files(tmp_path / "media") == []
    # And a name already taken is never overwritten: the second write gets another name.
    first = storage.save("dicom/a/b.dcm", ContentFile(b"first"))
    second = storage.save("dicom/a/b.dcm", ContentFile(b"second"))
    assert first != second
    assert (tmp_path / "media" / first).read_bytes() == b"first"
    assert [p.name for p in _files(tmp_path / "media")] == sorted(
        [Path(first).name, Path(second).name]
    )


def test_the_bucket_storage_leaves_nothing_when_a_write_fails(free_tcp_port: int) -> None:
    """A multipart upload that fails partway leaves neither an object nor its parts."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_tcp_port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{free_tcp_port}"
        credentials = {"access_key": "relay-test", "secret_key": "relay-test-secret"}
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="relay-test", aws_secret_access_key="relay-test-secret",
        )  # fmt: skip
        s3.create_bucket(Bucket="failing-writes")
        storage = AtomicS3Storage(
            bucket_name="failing-writes", endpoint_url=endpoint, region_name="us-east-1",
            file_overwrite=False, default_acl=None, **credentials,
        )  # fmt: skip

        class FailingRead(io.BytesIO):
            """20 MiB that cannot be read past 12 MiB (past boto3's 8 MiB multipart threshold)."""

            def read(self, size: int | None = -1) -> bytes:
                if self.tell() >= 12 * MiB:
                    raise OSError(errno.EIO, "Input/output error")
                return super().read(size)

        content = File(FailingRead(bytes(20 * MiB)), name="x.dcm")
        with pytest.raises(OSError, match="Input/output"):
            storage.save("dicom/a/b.dcm", content)
        assert s3.list_objects_v2(Bucket="failing-writes").get("Contents", []) == []
        assert s3.list_multipart_uploads(Bucket="failing-writes").get("Uploads", []) == []
    finally:
        server.stop()
