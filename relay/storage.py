"""How the image store is configured: a folder, or an S3-compatible bucket with server-side
encryption, and the deployment check that says when images would sit unencrypted at rest.

The images are PHI. In a bucket, every object Relay writes asks for server-side encryption:
SSE-S3 (`S3_SSE=AES256`) or SSE-KMS (`S3_SSE=aws:kms`, with `S3_SSE_KMS_KEY_ID` naming the key,
or the bucket's default KMS key). In a folder, encryption is the volume's (LUKS, an encrypted
EBS volume...): the operator declares it with `RELAY_STORAGE_ENCRYPTED=1` after setting it up.
`manage.py check --deploy` warns when neither is so (relay/checks.py).

Either way an object is written whole or not at all, so that a write failing partway (disk
full, a file size limit, the bucket dropping the connection) leaves no partial object without a
row: `AtomicFileSystemStorage` here, `relay.s3.AtomicS3Storage` for a bucket (in its own module
so that importing the settings does not import boto3).

Both also read an object in one go without asking first whether it exists (`read_bytes`: the
bytes, or None when there is none), and list every name below a folder at once (`names_under`):
the viewer's renders and thumbnails are read that way (transfers/viewer/render.py), so a frame
costs one request to a bucket, not a HEAD per check (issue 18).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import File
from django.core.files.storage import FileSystemStorage
from django.utils._os import safe_makedirs  # type: ignore[attr-defined]

PARTIAL_PREFIX = ".partial-"


class AtomicFileSystemStorage(FileSystemStorage):
    """Django's folder storage, writing each object whole or not at all.

    The bytes go to a hidden temporary file in the object's own folder, are flushed to disk,
    and only then get the object's name (a hard link: like Django's own O_EXCL open it never
    replaces an object of that name, it asks `get_available_name` for another). On any failure
    the temporary file is removed, so readers, `storage_verify` and the purge see either the
    whole object or none. A crash of the whole machine mid-write can leave a `.partial-*` file,
    which `storage_verify` reports as extra.
    """

    def _save(self, name: str, content: File) -> str:  # type: ignore[type-arg]
        full_path = self.path(name)
        directory = os.path.dirname(full_path)
        try:
            if self.directory_permissions_mode is not None:
                safe_makedirs(directory, self.directory_permissions_mode, exist_ok=True)
            else:
                os.makedirs(directory, exist_ok=True)
        except FileExistsError:
            raise FileExistsError(f"{directory} exists and is not a directory.") from None
        # mkstemp creates the file 0600; without a configured mode it stays so (patient data).
        fd, partial = tempfile.mkstemp(dir=directory, prefix=PARTIAL_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in content.chunks():
                    out.write(chunk if isinstance(chunk, bytes) else chunk.encode())
                out.flush()
                # Acknowledged means on disk: the name must not point at unwritten blocks.
                os.fsync(out.fileno())
            if self.file_permissions_mode is not None:
                os.chmod(partial, self.file_permissions_mode)
            while True:
                try:
                    if getattr(self, "_allow_overwrite", False):
                        os.replace(partial, full_path)
                    else:
                        os.link(partial, full_path)
                except FileExistsError:
                    name = self.get_available_name(name)
                    full_path = self.path(name)
                else:
                    break
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
        self._ensure_location_group_id(full_path)  # type: ignore[attr-defined]
        return os.path.relpath(full_path, self.location).replace("\\", "/")

    def read_bytes(self, name: str) -> bytes | None:
        """The whole object, or None when there is none (one open, no separate existence check
        that a purge could overtake)."""
        try:
            with open(self.path(name), "rb") as fp:
                return fp.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def names_under(self, folder: str) -> set[str]:
        """The name of every object below `folder`, at any depth (none while a write is still
        a hidden `.partial-*` file)."""
        root = self.path(folder)
        base = folder.rstrip("/")
        names: set[str] = set()
        for directory, _, files in os.walk(root):
            relative = os.path.relpath(directory, root).replace(os.sep, "/")
            inside = base if relative == "." else f"{base}/{relative}"
            names.update(f"{inside}/{f}" for f in files if not f.startswith(PARTIAL_PREFIX))
        return names


SSE_CHOICES = ("", "AES256", "aws:kms")


def s3_object_parameters(sse: str, kms_key_id: str = "") -> dict[str, str]:
    """The parameters every upload to the bucket carries for server-side encryption."""
    if sse not in SSE_CHOICES:
        raise ImproperlyConfigured(f"S3_SSE must be one of AES256, aws:kms or empty, not {sse!r}.")
    if kms_key_id and sse != "aws:kms":
        raise ImproperlyConfigured("S3_SSE_KMS_KEY_ID needs S3_SSE=aws:kms.")
    parameters: dict[str, str] = {}
    if sse:
        parameters["ServerSideEncryption"] = sse
    if kms_key_id:
        parameters["SSEKMSKeyId"] = kms_key_id
    return parameters


def s3_storage(
    *,
    bucket: str,
    endpoint_url: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    sse: str,
    kms_key_id: str = "",
) -> dict[str, Any]:
    return {
        "BACKEND": "relay.s3.AtomicS3Storage",
        "OPTIONS": {
            "bucket_name": bucket,
            "endpoint_url": endpoint_url,
            "region_name": region,
            "access_key": access_key,
            "secret_key": secret_key,
            "default_acl": None,
            "querystring_auth": True,
            "file_overwrite": False,
            "object_parameters": s3_object_parameters(sse, kms_key_id),
        },
    }
