"""The bucket storage (django-storages' S3Storage), writing each object whole or not at all, and
reading each one with a single request.

S3 itself never shows a partial object: a single PUT is stored whole or not, and boto3 aborts a
multipart upload that fails (its parts are dropped). What is left is the write that reached the
bucket but whose answer did not reach us (a timeout, a dropped connection): the caller sees a
failure and keeps no row, so the object would stay behind unreferenced. The name a write was
given is one `get_available_name` found free (`file_overwrite` is off), so on any failure it is
deleted, quietly, before the error goes on.

Reads. django-storages' `open()` costs two HEADs and a GET on every object (its S3File loads the
object's head to fail early, then boto3's download asks for the size again before the GET), and
a caller that asked `exists()` first paid a third HEAD: four round trips per frame or thumbnail
on S3 (issue 18). Here a read is one GetObject: `read_bytes` (a whole small object, None when
there is none: the viewer's renders and thumbnails, transfers/viewer/render.py) and `open(name,
"rb")` (everything else read back: the original DICOM objects behind the integrity check, the
ZIP, the disc image, DICOMweb) both ask for the object once and take a missing key (NoSuchKey,
404) as its absence. Nothing is cached between requests here: a read goes to the bucket, so what
is served is what the bucket holds under its own encryption, and a purged object is gone.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Any

from botocore.exceptions import ClientError
from django.core.files.base import File
from storages.backends.s3 import S3Storage, _filter_download_params
from storages.utils import clean_name, setting

log = logging.getLogger(__name__)

# The piece of an object's body copied at a time into the file `open()` returns.
READ_CHUNK = 1024 * 1024


class AtomicS3Storage(S3Storage):  # type: ignore[misc]
    def _save(self, name: str, content: Any) -> str:
        try:
            return str(super()._save(name, content))
        except BaseException:
            try:
                self.delete(name)
            except Exception as exc:  # the bucket is unreachable: nothing was written either
                log.warning(
                    "could not remove %s after a failed write: %s", name, type(exc).__name__
                )
            raise

    # --- reads: one GetObject each --------------------------------------------------------------

    def _get_object(self, name: str) -> dict[str, Any] | None:
        """The GetObject answer for the object (its Body still to be read), or None when the
        bucket has no such key. Any other refusal (AccessDenied, a KMS key the role may not
        use) is raised as it is."""
        key = self._normalize_name(clean_name(name))
        # Only what a download may carry (SSE-C keys, RequestPayer...): ServerSideEncryption and
        # SSEKMSKeyId are write parameters, and S3 decrypts SSE-S3 and SSE-KMS objects itself.
        params = _filter_download_params(self.get_object_parameters(key))
        try:
            answer = self.connection.meta.client.get_object(
                Bucket=self.bucket_name, Key=key, **params
            )
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404") or status == 404:
                return None
            raise
        return dict(answer)

    def read_bytes(self, name: str) -> bytes | None:
        """The whole object, or None when there is none: one GetObject, no HEAD."""
        if self.gzip:  # django-storages' own gzip handling (Relay never turns it on)
            try:
                with self.open(name, "rb") as fp:
                    return bytes(fp.read())
            except FileNotFoundError:
                return None
        answer = self._get_object(name)
        if answer is None:
            return None
        with contextlib.closing(answer["Body"]) as body:
            return bytes(body.read())

    def _open(self, name: str, mode: str = "rb") -> Any:
        if mode != "rb" or self.gzip:
            return super()._open(name, mode)
        answer = self._get_object(name)
        if answer is None:
            raise FileNotFoundError(f"File does not exist: {name}")
        # Copied into the same kind of file S3File keeps (callers seek: pydicom, the integrity
        # check's re-read of what was skipped), held in memory or spilled to disk by the same
        # setting (AWS_S3_MAX_MEMORY_SIZE), so reads use no more memory or disk than before.
        spool = tempfile.SpooledTemporaryFile(
            max_size=self.max_memory_size,
            suffix=".S3File",
            dir=setting("FILE_UPLOAD_TEMP_DIR"),
        )
        try:
            with contextlib.closing(answer["Body"]) as body:
                for chunk in body.iter_chunks(READ_CHUNK):
                    spool.write(chunk)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return File(spool, name=clean_name(name))

    def names_under(self, folder: str) -> set[str]:
        """The name of every object below `folder`, at any depth: one ListObjectsV2 per
        thousand objects (rather than a HEAD per object asked about)."""
        prefix = self._normalize_name(clean_name(folder)).rstrip("/") + "/"
        wanted = clean_name(folder).rstrip("/") + "/"
        names: set[str] = set()
        paginator = self.connection.meta.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket_name, Prefix=prefix):
            for entry in page.get("Contents", ()):
                names.add(wanted + str(entry["Key"])[len(prefix) :])
        return names
