"""The HTTP upload API used by the browser upload page, the `relay` uploader and scripts.

Authentication is an API token (`Authorization: Bearer rly_...`) or, for the browser, the
session cookie plus the CSRF token. Every answer is JSON with a human-readable `reason` when
something was refused.

- POST /api/v1/instances?facility=SLUG   one DICOM file as the body (application/dicom), or
                                         several as multipart/form-data fields named "file"
- POST /api/v1/instances/known           {"facility": SLUG, "sop_instance_uids": [...]} ->
                                         the ones this facility already stores (resume), with
                                         the SHA-256 of each stored copy
- POST /api/v1/manifests                 {"facility": SLUG, "instances": [{"sop_instance_uid", "sha256"}]}
                                         at the end of an upload: studies complete when intact
- GET  /api/v1/facilities                the facilities the caller may upload to

A fault on our side (the database, the image store or the temporary disk unavailable or full)
is answered 503 with a `Retry-After` header and {"status": "unavailable", "reason": ...}
(an upload's answer carries its other fields too): the uploader waits and sends it again.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from contextlib import suppress
from functools import wraps
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, UnreadablePostError
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from portal.access import (
    AuthedRequest,
    TokenRefused,
    bearer_token,
    facilities_of,
    token_authenticate,
    upload_facilities,
)
from portal.audit import audit_record, client_ip
from portal.lockout import address_blocked, address_failure
from portal.metrics import ingest_measure
from portal.models import ApiToken, AuditAction, Facility, Outcome, User

from .completion import ManifestError, manifest_apply
from .models import Instance, Share, ShareKind, Study
from .uids import is_valid_uid

if TYPE_CHECKING:
    from .ingest import IngestResult

# The ingest is imported by the functions that store or word an upload's results, not with this
# module: the URLs import it for GET /api/v1/facilities too, and transfers.ingest loads pydicom
# (with numpy, Pillow and the JPEG decoders), which a web worker serving pages never needs
# (tests/relay/test_lean_imports.py).

log = logging.getLogger(__name__)

MAX_KNOWN_UIDS = 10_000
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


# The ingest's reason for a file that is not DICOM cites the standard; whoever sent a README
# along with the images needs only to know that it was skipped and nothing else was affected.
_NOT_DICOM = "Not a DICOM file"
_NOT_DICOM_PLAIN = (
    "Not a DICOM file, skipped: DICOM files carry the marker 'DICM' after their first 128 bytes."
)


def _worded(result: IngestResult) -> IngestResult:
    from .ingest import REJECTED

    if result.status == REJECTED and result.reason.startswith(_NOT_DICOM):
        result.reason = _NOT_DICOM_PLAIN
    return result


def _error(reason: str, status: int) -> JsonResponse:
    return JsonResponse({"status": "error", "reason": reason}, status=status)


def _retry_later(response: JsonResponse) -> JsonResponse:
    response["Retry-After"] = str(settings.RELAY_RETRY_AFTER_SECONDS)
    return response


def _unavailable(reason: str) -> JsonResponse:
    """Our fault, not the request's: the same request may succeed in a while."""
    from .ingest import UNAVAILABLE

    return _retry_later(JsonResponse({"status": UNAVAILABLE, "reason": reason}, status=503))


def _form_failure(request: HttpRequest, exc: OSError) -> JsonResponse:
    """Reading a multipart form failed. Django spools each file past FILE_UPLOAD_MAX_MEMORY_SIZE
    to a temporary file in FILE_UPLOAD_TEMP_DIR, which can be full: that is ours to fix."""
    from .ingest import TEMP_DISK_DOWN

    if isinstance(exc, UnreadablePostError):
        return _error("The upload was cut off before the form arrived; send it again.", 400)
    log.error("temporary file write failed while receiving a form: %s", exc)
    # The rest of the form is read and dropped (the request is within the upload limit), so
    # that the sender gets the answer rather than a broken connection.
    with suppress(OSError):
        while request.read(1024 * 1024):
            pass
    return _unavailable(TEMP_DISK_DOWN)


def _form_files(request: HttpRequest) -> list[Any] | JsonResponse:
    try:
        return list(request.FILES.getlist("file"))
    except OSError as exc:
        return _form_failure(request, exc)


def api_view(view: Callable[..., HttpResponse] | None = None, *, writes: bool = False) -> Any:
    """Token or session authentication; CSRF is enforced for the session only. A token works
    only for its facility, and for views that `writes` only if it may upload."""
    if view is None:
        return lambda v: _api_view(v, view_writes=writes)
    return _api_view(view, view_writes=writes)


def _api_view(
    view: Callable[..., HttpResponse], *, view_writes: bool
) -> Callable[..., HttpResponse]:
    @csrf_exempt
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        raw = bearer_token(request)
        request.api_token = None  # type: ignore[attr-defined]
        if raw is not None:
            # An address that keeps sending bad tokens is refused for a while, good ones too.
            if address_blocked(request, "api_token_failed"):
                return _error("Too many refused tokens from this address; try again later.", 429)
            try:
                token = token_authenticate(raw, client_ip(request))
            except TokenRefused as exc:
                address_failure(request, "api_token_failed")
                audit_record(
                    action=AuditAction.TOKEN_REFUSED,
                    request=request,
                    outcome=Outcome.FAILURE,
                    detail={"reason": str(exc), "path": request.path},
                )
                return _error(f"The API token is not valid ({exc}).", 401)
            if request.method not in ("GET", "HEAD") and not token.can_write and view_writes:
                request.user = token.user
                request.api_token = token  # type: ignore[attr-defined]
                return _refused(request, "This API token is read-only.", 403)
            request.user = token.user
            request.api_token = token  # type: ignore[attr-defined]
        elif request.user.is_authenticated:
            try:
                # Reads the form of a POST (spooling its files) for the CSRF field.
                refused = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(
                    request, view, args, kwargs
                )
            except OSError as exc:
                return _form_failure(request, exc)
            if refused is not None:
                return _error("The CSRF check failed; reload the page.", 403)
        else:
            return _error("Sign in, or send an API token as 'Authorization: Bearer <token>'.", 401)
        return view(request, *args, **kwargs)

    return wrapper


# Bounds of a JSON body: the largest manifest (20,000 entries of a UID and a SHA-256) is about
# 3.5 MB, and no body we expect nests deeper than 3. Python's parser recurses, so a body of
# 100,000 '[' would otherwise end in a RecursionError; the depth is counted before parsing.
JSON_MAX_BYTES = 8 * 1024 * 1024
JSON_MAX_DEPTH = 16
# A string (unterminated too, so the scan stays linear) or a bracket.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def _json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings ignored)."""
    depth = deepest = 0
    for token in _JSON_TOKEN.findall(body):
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def _json_object(request: HttpRequest, shape: str) -> dict[str, Any] | JsonResponse:
    """The request body as a JSON object, or a 400 that says what shape was expected (413 when
    it is larger than RELAY_JSON_MAX_BYTES, 400 when nested deeper than RELAY_JSON_MAX_DEPTH)."""
    from .ingest import human_size

    limit = getattr(settings, "RELAY_JSON_MAX_BYTES", JSON_MAX_BYTES)
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    too_big = _error(f"The JSON body is larger than the {human_size(limit)} limit.", 413)
    if declared > limit:
        return too_big
    # Read here rather than through request.body, whose own cap (DATA_UPLOAD_MAX_MEMORY_SIZE)
    # would answer a full-size manifest with a bare 400; never more than the limit plus one byte.
    body = request.read(limit + 1)
    if len(body) > limit:
        return too_big
    max_depth = getattr(settings, "RELAY_JSON_MAX_DEPTH", JSON_MAX_DEPTH)
    if _json_depth(body) > max_depth:
        return _error(f"The JSON body is nested more than {max_depth} deep. {shape}", 400)
    if b"\\u0000" in body:
        # PostgreSQL cannot hold a NUL in text; no UID, slug or hash has one.
        return _error(f"The JSON body contains a NUL character. {shape}", 400)
    try:
        payload = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return _error(shape, 400)
    return payload if isinstance(payload, dict) else _error(shape, 400)


def _token_of(request: HttpRequest) -> ApiToken | None:
    return getattr(request, "api_token", None)


def _refused(request: HttpRequest, reason: str, status: int, slug: object = None) -> JsonResponse:
    """A refusal, audited (to the facility it was about, when there is one) and answered."""
    token = _token_of(request)
    facility = None
    if isinstance(slug, str) and 0 < len(slug) <= 60:
        facility = Facility.objects.filter(slug=slug).first()
    audit_record(
        action=AuditAction.ACCESS_DENIED,
        request=request,
        facility=facility,
        outcome=Outcome.FAILURE,
        detail={"reason": reason[:200], "api": request.path, "token": token.hint if token else ""},
    )
    return _error(reason, status)


def _upload_facility(
    request: HttpRequest, slug: str | None, *, write: bool = True
) -> Facility | JsonResponse:
    """The facility a request acts on: one the person may upload to (or, to read, belongs to),
    and, with a token, the token's own facility."""
    user: User = request.user  # type: ignore[assignment]
    token = _token_of(request)
    allowed = list(upload_facilities(user) if write else facilities_of(user))
    if token is not None and token.facility_id is not None:
        # A token works for its one facility (while its owner may still act there).
        allowed = [f for f in allowed if f.pk == token.facility_id]
    if slug:
        for facility in allowed:
            if facility.slug == slug:
                return facility
        verb = "upload to" if write else "read"
        return _refused(request, f"You cannot {verb} a facility '{slug}'.", 403, slug)
    if len(allowed) == 1:
        return allowed[0]
    if not allowed:
        return _refused(request, "You are not a sender at any facility.", 403)
    names = ", ".join(f.slug for f in allowed)
    return _error(f"Say which facility to upload to (?facility=...): one of {names}.", 400)


@require_GET
@api_view
def facilities(request: AuthedRequest) -> JsonResponse:
    token = _token_of(request)
    mine = upload_facilities(request.user)
    if token is not None and token.facility_id is not None:
        mine = mine.filter(pk=token.facility_id)
    rows = [{"slug": f.slug, "name": f.name} for f in mine]
    return JsonResponse({"facilities": rows})


@require_POST
@api_view(writes=True)
def instances_upload(request: AuthedRequest) -> JsonResponse:
    from .ingest import (
        REJECTED,
        UNAVAILABLE,
        IngestBatch,
        IngestResult,
        human_size,
        instance_ingest,
        read_chunks,
    )

    facility = _upload_facility(request, request.GET.get("facility"))
    if isinstance(facility, JsonResponse):
        return facility
    limit = settings.RELAY_MAX_UPLOAD_BYTES
    content_type = request.content_type or ""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if content_type == "multipart/form-data":
        if length > limit:
            return _error(f"The request is larger than the {human_size(limit)} limit.", 413)
        files = _form_files(request)
        if isinstance(files, JsonResponse):
            return files
        if not files:
            return _error("No file fields named 'file' in the form.", 400)
        # The rows of the form's files are written together (their results are final once
        # the batch has committed them, on leaving the block).
        with IngestBatch(
            facility=facility,
            user=request.user,
            source="api",
            request=request,
            actor_facility=facility,
        ) as batch:
            results = [
                instance_ingest(
                    facility=facility,
                    user=request.user,
                    chunks=upload.chunks(),
                    filename=upload.name or "",
                    source="api",
                    request=request,
                    batch=batch,
                )
                for upload in files
            ]
        return _results_response([_worded(result) for result in results])
    if "CONTENT_LENGTH" not in request.META or request.META["CONTENT_LENGTH"] == "":
        return _error("Send the DICOM file as the request body with a Content-Length.", 411)
    filename = unquote(request.META.get("HTTP_X_FILENAME", ""))[:255]
    if _CONTROL_CHARACTER.search(filename):
        # A NUL cannot go into PostgreSQL text (it would surface as "database unavailable");
        # no honest client sends one, so it is refused, audited, before the body is read.
        return _refused(
            request, "The X-Filename header contains control characters.", 400, facility.slug
        )
    if length > limit:
        # Refused before reading a byte of it.
        ingest_measure(
            source="browser" if bearer_token(request) is None else "api",
            user_agent=request.META.get("HTTP_USER_AGENT", ""),
            outcome=REJECTED,
            size=0,
        )
        result = IngestResult(
            REJECTED,
            filename=filename,
            reason=f"The file is larger than the {human_size(limit)} limit.",
            http_status=413,
        )
        return JsonResponse(result.as_dict(), status=413)
    result = _worded(
        instance_ingest(
            facility=facility,
            user=request.user,
            chunks=read_chunks(request),
            filename=filename,
            expected_size=length,
            source="browser" if bearer_token(request) is None else "api",
            request=request,
            # _upload_facility checked that they may upload there: they act for it.
            actor_facility=facility,
        )
    )
    response = JsonResponse(result.as_dict(), status=result.http_status)
    return _retry_later(response) if result.status == UNAVAILABLE else response


def _results_response(results: list[IngestResult]) -> JsonResponse:
    from .ingest import UNAVAILABLE

    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    if counts.get(UNAVAILABLE) == len(results):
        status = 503  # nothing was stored: the whole form can be sent again
    elif all(r.http_status < 300 for r in results):
        status = 200
    else:
        status = 207
    body: dict[str, Any] = {"counts": counts, "results": [r.as_dict() for r in results]}
    if status == 503:
        body.update(status=UNAVAILABLE, reason=results[0].reason)
    response = JsonResponse(body, status=status)
    return _retry_later(response) if UNAVAILABLE in counts else response


@require_POST
@api_view
def instances_known(request: AuthedRequest) -> JsonResponse:
    payload = _json_object(
        request, 'The body must be JSON: {"facility": ..., "sop_instance_uids": [...]}.'
    )
    if isinstance(payload, JsonResponse):
        return payload
    uids = payload.get("sop_instance_uids", [])
    slug = payload.get("facility")
    if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
        return _error("'sop_instance_uids' must be a list of strings.", 400)
    if len(uids) > MAX_KNOWN_UIDS:
        return _error(f"Ask about at most {MAX_KNOWN_UIDS} UIDs at a time.", 400)
    facility = _upload_facility(request, slug, write=False)
    if isinstance(facility, JsonResponse):
        return facility
    wanted = [u for u in uids if is_valid_uid(u)]
    # With each UID the SHA-256 of the stored copy (preamble zeroed; a reconciled copy also
    # by the hash it came with), so an uploader tells "already here" from "other bytes here".
    hashes: dict[str, list[str]] = {}
    for uid, sha, original in Instance.objects.rows_by_uid(
        facility, wanted, "sop_instance_uid", "sha256", "original_sha256"
    ):
        hashes[uid] = sorted({sha, original} - {""})
    return JsonResponse({"facility": facility.slug, "known": sorted(hashes), "hashes": hashes})


@require_POST
@api_view(writes=True)
def manifest(request: AuthedRequest) -> JsonResponse:
    """The end of an upload: what was sent, so the server can tell when studies are complete."""
    payload = _json_object(
        request,
        'The body must be JSON: {"facility": ..., "instances": [{"sop_instance_uid", "sha256"}]}.',
    )
    if isinstance(payload, JsonResponse):
        return payload
    entries = payload.get("instances", [])
    slug = payload.get("facility")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return _error("'instances' must be a list of {sop_instance_uid, sha256} objects.", 400)
    facility = _upload_facility(request, slug)
    if isinstance(facility, JsonResponse):
        return facility
    # "announce": true before an upload: the instances about to be sent, each with its
    # study_instance_uid; their studies are not complete until all are stored intact (or
    # expire, or the sender gives up). "withdraw": UIDs of files the server rejected.
    from .completion import expectations_announce

    announce = payload.get("announce", False)
    withdraw = payload.get("withdraw", [])
    if not isinstance(announce, bool):
        return _error("'announce' must be true or false.", 400)
    if not isinstance(withdraw, list) or not all(isinstance(u, str) for u in withdraw):
        return _error("'withdraw' must be a list of SOP Instance UIDs.", 400)
    try:
        if announce:
            return JsonResponse(expectations_announce(facility=facility, entries=entries))
        result = manifest_apply(facility=facility, entries=entries, withdraw=withdraw)
    except ManifestError as exc:
        return _error(str(exc), 400)
    body = result.as_dict()
    # Of the studies now complete, those with a live share whose recipients are e-mailed: the
    # upload page says "recipients are notified" only when there are some.
    shares = Share.objects.active().exclude(kind=ShareKind.PATIENT)
    body["shared"] = sorted(
        str(uuid)
        for uuid in Study.objects.filter(
            facility=facility, uuid__in=result.complete, shares__in=shares
        )
        .values_list("uuid", flat=True)
        .distinct()
    )
    return JsonResponse(body)
