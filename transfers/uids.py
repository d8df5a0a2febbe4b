"""The shape of a DICOM UID (PS3.5 9.1), checked without pydicom.

Views and services that only look at UIDs (the API, the DICOMweb searches, manifests) import it
from here rather than from `transfers.ingest`, whose import loads pydicom and with it numpy,
Pillow and the JPEG decoders: a web worker serving pages loads none of them
(tests/relay/test_lean_imports.py).
"""

from __future__ import annotations

import re

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and bool(UID_RE.match(value))
