"""STOW-RS (PS3.18 §10.5): POST /dicom-web/studies and /dicom-web/studies/{S}.

The body is `multipart/related; type="application/dicom"; boundary=...`, one Part 10 file per
part. It is read as it arrives (with a Content-Length, or chunked: dicomweb-client sends bodies
over 1 MB chunked, which Django's request.body reads as empty, so the server's decoded
`wsgi.input` is read instead) and split by python-multipart; each part's bytes go straight into
`instance_ingest`, which spools them to a temporary file: no part is held in memory, and memory
stays flat whatever the parts weigh. Every part is checked, deduplicated and audited as an
upload (`source: dicomweb`); the rows of the request's instances are committed together by an
`IngestBatch` before the answer is sent.

The answer is one DICOM JSON object (Content-Type exactly `application/dicom+json`):
ReferencedSOPSequence (0008,1199) for every instance now held (stored, or already there with the
same bytes), with its RetrieveURL; FailedSOPSequence (0008,1198) with a FailureReason for the
others; the study's RetrieveURL (0008,1190) when all belong to one study. Each failure's reason
in words goes in a `Warning: 299` header. HTTP status: 200 all held, 202 some failed, 409 none
held, 503 (with Retry-After) when nothing could be stored for a fault of ours; 400 for a body
that is not the multipart it says, 415 for any other media type.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.http import parse_header_parameters
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from portal.audit import audit_record
from portal.metrics import ingest_measure
from portal.models import AuditAction, Facility, Outcome, User

from ..api import _upload_facility
from ..ingest import (
    CONFLICT,
    DUPLICATE,
    REJECTED,
    STORED,
    UNAVAILABLE,
    IngestBatch,
    IngestResult,
    Rejected,
    instance_ingest,
    read_chunks,
    upload_detail,
)

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
MAX_PART_HEADERS = 32
# RFC 2046 says at most 70 characters; Orthanc's DICOMweb plugin sends 73 (two UUIDs).
MAX_BOUNDARY = 256
# PS3.18 Table I.2-2 (FailureReason) as the gateway answers C-STORE.
CANNOT_UNDERSTAND = 0xC000  # not DICOM, no UIDs, too deep, not in the study named
DOES_NOT_MATCH = 0xA900  # the SOP Instance UID already held with other bytes
OUT_OF_RESOURCES = 0xA700  # storage or database down: the sender may send it again
# How many distinct failure reasons the Warning header carries.
MAX_WARNINGS = 10


class BadBody(Exception):
    """The body is not the multipart/related it says it is."""


# --- the body, part by part -----------------------------------------------------------------------


def _body_chunks(request: HttpRequest) -> Iterator[bytes] | None:
    """The request body as it arrives, or None when it has neither a length nor chunks."""
    if request.META.get("CONTENT_LENGTH"):
        return read_chunks(request)
    if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        # Django reads a body without a Content-Length as empty; the server (gunicorn) has
        # already decoded the chunks in wsgi.input, which ends where the body ends.
        return read_chunks(request.META["wsgi.input"])
    return None


class Part:
    """One part of the body: its headers, then its bytes as they arrive."""

    def __init__(self, reader: PartReader, headers: dict[str, str]) -> None:
        self._reader = reader
        self.headers = headers
        self.done = False

    def chunks(self) -> Iterator[bytes]:
        while not self.done:
            kind, value = self._reader.event()
            if kind == "data":
                yield value
            elif kind == "end":
                self.done = True
            else:  # the body ended inside this part
                self.done = True
                raise Rejected("The request was cut off inside this part; it was not stored.")

    def drain(self) -> None:
        """Skip what ingest left unread (a part refused before its end)."""
        for _ in self.chunks():
            pass


class PartReader:
    """The parts of a multipart body, read lazily: python-multipart is fed one chunk of the body
    at a time, and what it finds in it (headers, bytes, ends of parts) is queued until taken.
    At most one chunk of the body is held at a time."""

    def __init__(self, body: Iterator[bytes], boundary: str) -> None:
        self._body = body
        self._events: deque[tuple[str, Any]] = deque()
        self._name = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self._ended = False
        self._parser = MultipartParser(
            boundary.encode("latin-1"),
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._name.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": lambda: self._events.append(("headers", self._headers)),
                "on_part_data": lambda data, start, end: self._events.append(
                    ("data", bytes(data[start:end]))
                ),
                "on_part_end": lambda: self._events.append(("end", None)),
                "on_end": self._end,
            },
            max_header_count=MAX_PART_HEADERS,
        )

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        name = self._name.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._name.clear()
        self._value.clear()

    def _end(self) -> None:
        self._ended = True

    def event(self) -> tuple[str, Any]:
        """The next thing found in the body; ("eof", None) once it has ended."""
        while not self._events:
            if self._ended:
                return ("eof", None)
            try:
                chunk = next(self._body)
            except StopIteration:
                self._parser.finalize()
                self._ended = True
                if not self._events:
                    return ("eof", None)
                break
            except OSError as exc:  # the connection dropped
                raise BadBody(f"the body could not be read to its end ({exc})") from None
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                raise BadBody(str(exc)) from None
        return self._events.popleft()

    def parts(self) -> Iterator[Part]:
        while True:
            kind, value = self.event()
            if kind == "eof":
                return
            if kind == "headers":
                part = Part(self, dict(value))
                yield part
                part.drain()


# --- the answer -----------------------------------------------------------------------------------


def _item(result: IngestResult) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if result.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [result.sop_class_uid]}
    if result.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [result.sop_instance_uid]}
    return item


def _failure_reason(result: IngestResult) -> int:
    if result.status == CONFLICT:
        return DOES_NOT_MATCH
    if result.status == UNAVAILABLE:
        return OUT_OF_RESOURCES
    return CANNOT_UNDERSTAND


def stow_answer(results: list[IngestResult], base_url: str) -> HttpResponse:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) and its HTTP status."""
    held = [r for r in results if r.status in (STORED, DUPLICATE)]
    failed = [r for r in results if r.status not in (STORED, DUPLICATE)]
    body: dict[str, Any] = {}
    studies = {r.study_instance_uid for r in held}
    if len(studies) == 1:
        body["00081190"] = {"vr": "UR", "Value": [f"{base_url}studies/{next(iter(studies))}"]}
    referenced = []
    for result in held:
        item = _item(result)
        item["00081190"] = {
            "vr": "UR",
            "Value": [
                f"{base_url}studies/{result.study_instance_uid}/series/"
                f"{result.series_instance_uid}/instances/{result.sop_instance_uid}"
            ],
        }
        referenced.append(item)
    failures = []
    for result in failed:
        item = _item(result)
        item["00081197"] = {"vr": "US", "Value": [_failure_reason(result)]}
        failures.append(item)
    body["00081199"] = {"vr": "SQ", "Value": referenced}
    body["00081198"] = {"vr": "SQ", "Value": failures}
    if failed and all(r.status == UNAVAILABLE for r in results):
        status = 503  # nothing was stored: the whole request can be sent again
    elif not failed:
        status = 200
    elif held:
        status = 202
    else:
        status = 409
    response = JsonResponse(body, status=status, json_dumps_params={"ensure_ascii": False})
    # Exactly this: dicomweb-client reads no answer whose type carries a charset.
    response["Content-Type"] = DICOM_JSON
    if any(r.status == UNAVAILABLE for r in results):
        response["Retry-After"] = str(settings.RELAY_RETRY_AFTER_SECONDS)
    reasons = list(dict.fromkeys(r.reason for r in failed if r.reason))[:MAX_WARNINGS]
    if reasons:
        agent = urlsplit(settings.SITE_URL).netloc or "relay"
        response["Warning"] = ", ".join(
            f'299 {agent} "{{}}"'.format(
                reason.replace("\\", "").replace('"', "'").encode("ascii", "replace").decode()
            )
            for reason in reasons
        )
    return response


# --- the view -------------------------------------------------------------------------------------


def _text(reason: str, status: int) -> HttpResponse:
    return HttpResponse(reason, status=status, content_type="text/plain; charset=utf-8")


def stow(request: HttpRequest, base_url: str, study: str | None = None) -> HttpResponse:
    """Store the instances of the body (authentication already done, a writing one)."""
    main, params = parse_header_parameters(request.META.get("CONTENT_TYPE", ""))
    part_type = params.get("type", "application/dicom").split(";")[0].strip().lower()
    if main != "multipart/related" or part_type != "application/dicom":
        return _text(
            'Send the instances as multipart/related; type="application/dicom" '
            "(the metadata and bulk data form is not accepted).",
            415,
        )
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        return _text("The multipart/related Content-Type has no usable boundary.", 400)
    facility = _upload_facility(request, request.GET.get("facility"))
    if isinstance(facility, JsonResponse):
        return facility
    body = _body_chunks(request)
    if body is None:
        return _text(
            "Send the instances as the request body (with a Content-Length, or chunked).", 411
        )
    user: User | None = request.user if request.user.is_authenticated else None  # type: ignore[assignment]
    results: list[IngestResult] = []
    reader = PartReader(body, boundary)
    try:
        with IngestBatch(
            facility=facility,
            user=user,
            source="dicomweb",
            request=request,
            # _upload_facility checked that they may upload there: they act for it.
            actor_facility=facility,
        ) as batch:
            for part in reader.parts():
                results.append(_part_ingest(request, part, batch, facility, user, study))
    except BadBody as exc:
        # What was complete before the fault is kept (committed by the batch on its way out).
        log.info("STOW-RS body unreadable after %d parts: %s", len(results), exc)
        if not results:
            return _text(f"The multipart body cannot be read: {exc}.", 400)
    if not results:
        return _text("The multipart body holds no instances.", 400)
    return stow_answer(results, base_url)


def _part_ingest(
    request: HttpRequest,
    part: Part,
    batch: IngestBatch,
    facility: Facility,
    user: User | None,
    study: str | None,
) -> IngestResult:
    content_type = part.headers.get("content-type", "application/dicom")
    if parse_header_parameters(content_type)[0] != "application/dicom":
        part.drain()
        result = IngestResult(
            REJECTED, reason="A part is not application/dicom; it was not stored.", http_status=415
        )
        # Audited as instance_ingest audits a refused file.
        audit_record(
            action=AuditAction.UPLOAD,
            request=request,
            actor=user,
            facility=facility,
            actor_facility=batch.actor_facility(),
            outcome=Outcome.FAILURE,
            detail=upload_detail(result, source="dicomweb", filename=""),
        )
        ingest_measure(source="dicomweb", user_agent="", outcome=REJECTED, size=0)
        return result
    return instance_ingest(
        facility=facility,
        user=user,
        chunks=part.chunks(),
        source="dicomweb",
        request=request,
        batch=batch,
        only_study=study,
    )
