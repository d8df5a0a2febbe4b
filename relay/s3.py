"""The bucket storage (django-storages' S3Storage), writing each object whole or not at all.

S3 itself never shows a partial object: a single PUT is stored whole or not, and boto3 aborts a
multipart upload that fails (its parts are dropped). What is left is the write that reached the
bucket but whose answer did not reach us (a timeout, a dropped connection): the caller sees a
failure and keeps no row, so the object would stay behind unreferenced. The name a write was
given is one `get_available_name` found free (`file_overwrite` is off), so on any failure it is
deleted, quietly, before the error goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from storages.backends.s3 import S3Storage

log = logging.getLogger(__name__)


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
