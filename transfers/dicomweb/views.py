"""DICOMweb resources under /dicom-web/ (PS3.18): QIDO-RS searches, WADO-RS retrievals, STOW-RS.

Authentication is the upload API's (`transfers.api.api_view`): an API token
(`Authorization: Bearer`, a read-only token is enough) or the signed-in session. What a request
may see is `scope`'s: a search lists only visible studies; a retrieval of anything else is a 404,
audited. Whole instances are a copy (the download right, audited as `study_download` and metered
as a delivery once their last byte is out); metadata is a view (audited as `study_view`); frames
and bulk data are parts of that view, as the viewer's frames are: not audited one by one,
metered once per request.

Methods: each resource answers GET here; searches HEAD too (a retrieval's HEAD would be
audited and metered as the whole answer, so it is refused). `/studies` and `/studies/{S}` take
POST too: STOW-RS (`stow`), with the upload API's writing authentication (a token that may
upload, or the session with its CSRF token).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, cast
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_safe

from portal.audit import audit_record
from portal.models import AuditAction

from .. import integrity
from ..access import StudyAccess
from ..api import api_view as _api_view
from ..deliveries import receiving_facility_of
from ..models import Instance
from ..sharing.services import share_downloaded
from . import retrieve, search
from .accept import AcceptError, accept_parse
from .answers import delivery_meter, text_answer, uids_refused
from .scope import DownloadRefused, Need, facilities_visible, studies_visible, study_for

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"


# --- helpers ------------------------------------------------------------------------------------


def api_view(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """The upload API's authentication (token or session), for GET views that may stream."""
    return cast(Callable[..., HttpResponseBase], _api_view(cast(Callable[..., HttpResponse], view)))


def _base_url(request: HttpRequest) -> str:
    """The absolute URL of /dicom-web/, ending in a slash, on SITE_URL: never built from the
    Host header, which a client may set to anything (dicomweb-client sends it without the
    port), so RetrieveURLs and BulkDataURIs always point at Relay itself."""
    return settings.SITE_URL + reverse("dicomweb_studies").removesuffix("studies")


def _accepts_json(request: HttpRequest) -> bool:
    try:
        ranges = accept_parse(request.headers.get("Accept"))
    except AcceptError:
        return False
    return any(
        media.type in ("*/*", "application/*", "application/json", DICOM_JSON) for media in ranges
    )


def _warning(response: HttpResponseBase, texts: list[str]) -> None:
    if texts:
        agent = urlsplit(settings.SITE_URL).netloc or "relay"
        response["Warning"] = ", ".join(f'299 {agent} "{text}"' for text in texts)


def _damaged(
    request: HttpRequest, instance: Instance | None, exc: Exception, where: str
) -> HttpResponse:
    """A stored copy found damaged or missing while building an answer: audited, staff told,
    and the client told plainly (nothing of the image is sent)."""
    reason = exc.reason if isinstance(exc, integrity.IntegrityError) else "missing from storage"
    key = exc.key if isinstance(exc, integrity.IntegrityError) else ""
    integrity.integrity_failure(instance, where, request, key=key, reason=reason)
    return text_answer(
        "A stored copy of this image is damaged or missing; staff have been told.", 500
    )


def _by_method(**views: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """One resource, one view per method (STOW-RS adds POST to /studies and /studies/{S})."""

    def dispatch(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        view = views.get(request.method or "")
        if view is None:
            return HttpResponseNotAllowed(sorted(views))
        return view(request, *args, **kwargs)

    # Each method's view is an api_view, which checks CSRF itself for a session (and not for a
    # token): the middleware must not refuse a token's POST before it gets there.
    return csrf_exempt(dispatch)


# --- QIDO-RS --------------------------------------------------------------------------------------


def _search(
    request: HttpRequest, level: search.Level, fixed: dict[str, str] | None = None
) -> HttpResponse:
    if not _accepts_json(request):
        return text_answer(f"Search results are sent as {DICOM_JSON}.", 406)
    if fixed and (bad := uids_refused(*fixed.values())):
        return bad
    params = [(key, value) for key, values in request.GET.lists() for value in values]
    try:
        query = search.search_parse(level, params, fixed=fixed)
    except search.QueryError as exc:
        return text_answer(str(exc), 400)
    answers, more = search.search_run(
        query,
        studies_visible(request),
        retrieve_base=_base_url(request),
        facilities=facilities_visible(request),
    )
    response = JsonResponse(answers, safe=False, json_dumps_params={"ensure_ascii": False})
    response["Content-Type"] = DICOM_JSON
    warnings = list(query.warnings)
    if more:
        warnings.append(search.WARN_MORE)
    _warning(response, warnings)
    return response


@api_view
def qido_studies(request: HttpRequest) -> HttpResponse:
    return _search(request, search.Level.STUDY)


@require_safe
@api_view
def qido_series(request: HttpRequest) -> HttpResponse:
    return _search(request, search.Level.SERIES)


@require_safe
@api_view
def qido_study_series(request: HttpRequest, study: str) -> HttpResponse:
    return _search(request, search.Level.SERIES, {"StudyInstanceUID": study})


@require_safe
@api_view
def qido_instances(request: HttpRequest) -> HttpResponse:
    return _search(request, search.Level.INSTANCE)


@require_safe
@api_view
def qido_study_instances(request: HttpRequest, study: str) -> HttpResponse:
    return _search(request, search.Level.INSTANCE, {"StudyInstanceUID": study})


@require_safe
@api_view
def qido_series_instances(request: HttpRequest, study: str, series: str) -> HttpResponse:
    return _search(
        request,
        search.Level.INSTANCE,
        {"StudyInstanceUID": study, "SeriesInstanceUID": series},
    )


# --- WADO-RS: which instances --------------------------------------------------------------------


def _instances(access: StudyAccess, series: str | None, instance: str | None) -> list[Instance]:
    queryset = Instance.objects.filter(series__study=access.study)
    if series is not None:
        queryset = queryset.filter(series__series_instance_uid=series)
    if instance is not None:
        queryset = queryset.filter(sop_instance_uid=instance)
    return list(
        queryset.select_related("series").order_by(
            "series__series_number", "series_id", "instance_number", "pk"
        )
    )


def _resolve(
    request: HttpRequest, need: Need, study: str, series: str | None, instance: str | None
) -> tuple[StudyAccess, list[Instance]] | HttpResponse:
    """The access and the instances a retrieval names, or the answer that refuses it."""
    if bad := uids_refused(*(uid for uid in (study, series, instance) if uid is not None)):
        return bad
    try:
        access = study_for(request, study, need=need)
    except DownloadRefused:
        return text_answer(
            "This share lets you view the study but not download it. Ask the sender for a copy.",
            403,
        )
    instances = _instances(access, series, instance)
    if not instances:
        return text_answer("No such series or instance in this study.", 404)
    return access, instances


def _instance_url(request: HttpRequest, instance: Instance, study: str) -> str:
    return (
        f"{_base_url(request)}studies/{study}/series/{instance.series.series_instance_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


def _receipt(
    chunks: Iterator[bytes],
    *,
    request: HttpRequest,
    access: StudyAccess,
    images: int,
    nbytes: int,
    key_parts: tuple[object, ...],
    where: str,
    download: str = "",
) -> Iterator[bytes]:
    """The answer's bytes; once the last is out, one delivery for the whole request (none for
    the holder's own people). A damaged stored copy on the way is audited, staff are told, and
    the error goes on up: the multipart body is left unfinished, and nothing is metered."""
    try:
        yield from chunks
    except integrity.IntegrityError as exc:
        instance = Instance.objects.filter(storage_key=exc.key).first()
        integrity.integrity_failure(instance, where, request, key=exc.key, reason=exc.reason)
        raise
    if access.share is None:
        return
    with transaction.atomic():
        if download:
            # Whole instances taken: the sender's "downloaded" receipt, as for a ZIP.
            share_downloaded(share=access.share, who=access.who, what=download)
        delivery_meter(request, access, images=images, nbytes=nbytes, key_parts=key_parts)


def _audit(request: HttpRequest, access: StudyAccess, action: str, **detail: Any) -> None:
    if access.share is not None:
        detail["share"] = str(access.share.uuid)
    audit_record(
        action=action,
        request=request,
        study=access.study,
        actor_facility=receiving_facility_of(share=access.share, user=request.user),
        detail={"via": "dicomweb", **detail},
    )


# --- WADO-RS: instances -------------------------------------------------------------------------


def _retrieve(
    request: HttpRequest, study: str, series: str | None = None, instance: str | None = None
) -> HttpResponseBase:
    try:
        ranges = accept_parse(request.headers.get("Accept"))
    except AcceptError as exc:
        return text_answer(f"The Accept header cannot be read: {exc}.", 400)
    resolved = _resolve(request, Need.DOWNLOAD, study, series, instance)
    if isinstance(resolved, HttpResponse):
        return resolved
    access, instances = resolved
    try:
        syntax = retrieve.instances_syntax(ranges, {i.transfer_syntax_uid for i in instances})
    except retrieve.NotAcceptable as exc:
        return text_answer(str(exc), 406)
    nbytes = sum(i.size_bytes for i in instances)
    level = "instance" if instance else "series" if series else "study"
    _audit(
        request,
        access,
        AuditAction.STUDY_DOWNLOAD,
        format="dicomweb",
        level=level,
        images=len(instances),
        bytes=nbytes,
        transfer_syntax=syntax,
    )
    boundary = retrieve.boundary_new()
    response = StreamingHttpResponse(
        _receipt(
            retrieve.instances_stream(instances, syntax, boundary),
            request=request,
            access=access,
            images=len(instances),
            nbytes=nbytes,
            key_parts=(level, instance or series or study, len(instances), nbytes),
            where="dicomweb",
            download=f"{len(instances)} images by DICOMweb",
        ),
        content_type=retrieve.multipart_content_type("application/dicom", boundary),
    )
    return response


@api_view
def wado_study(request: HttpRequest, study: str) -> HttpResponseBase:
    return _retrieve(request, study)


@require_GET
@api_view
def wado_series(request: HttpRequest, study: str, series: str) -> HttpResponseBase:
    return _retrieve(request, study, series)


@require_GET
@api_view
def wado_instance(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponseBase:
    return _retrieve(request, study, series, instance)


# --- WADO-RS: metadata --------------------------------------------------------------------------


def _metadata(
    request: HttpRequest, study: str, series: str | None = None, instance: str | None = None
) -> HttpResponseBase:
    if not _accepts_json(request):
        return text_answer(f"Metadata is sent as {DICOM_JSON}.", 406)
    resolved = _resolve(request, Need.VIEW, study, series, instance)
    if isinstance(resolved, HttpResponse):
        return resolved
    access, instances = resolved
    _audit(request, access, AuditAction.STUDY_VIEW, what="metadata", images=len(instances))
    if len(instances) == 1:
        # One instance: read before answering, so that a damaged copy is a clean 500.
        try:
            body = b"".join(
                retrieve.metadata_stream(instances, lambda i: _instance_url(request, i, study))
            )
        except (integrity.IntegrityError, FileNotFoundError) as exc:
            return _damaged(request, instances[0], exc, "dicomweb metadata")
        return HttpResponse(body, content_type=DICOM_JSON)
    return StreamingHttpResponse(
        _integrity_checked(
            retrieve.metadata_stream(instances, lambda i: _instance_url(request, i, study)),
            request=request,
        ),
        content_type=DICOM_JSON,
    )


def _integrity_checked(chunks: Iterator[bytes], *, request: HttpRequest) -> Iterator[bytes]:
    try:
        yield from chunks
    except integrity.IntegrityError as exc:
        instance = Instance.objects.filter(storage_key=exc.key).first()
        integrity.integrity_failure(
            instance, "dicomweb metadata", request, key=exc.key, reason=exc.reason
        )
        raise


@require_GET
@api_view
def metadata_study(request: HttpRequest, study: str) -> HttpResponseBase:
    return _metadata(request, study)


@require_GET
@api_view
def metadata_series(request: HttpRequest, study: str, series: str) -> HttpResponseBase:
    return _metadata(request, study, series)


@require_GET
@api_view
def metadata_instance(
    request: HttpRequest, study: str, series: str, instance: str
) -> HttpResponseBase:
    return _metadata(request, study, series, instance)


# --- WADO-RS: frames and bulk data --------------------------------------------------------------


def _pixels_answer(
    request: HttpRequest,
    study: str,
    series: str,
    instance: str,
    build: Callable[[Instance, list[Any]], retrieve.Parts],
    *,
    what: str,
    images: Callable[[], int],
) -> HttpResponseBase:
    try:
        ranges = accept_parse(request.headers.get("Accept"))
    except AcceptError as exc:
        return text_answer(f"The Accept header cannot be read: {exc}.", 400)
    resolved = _resolve(request, Need.VIEW, study, series, instance)
    if isinstance(resolved, HttpResponse):
        return resolved
    access, (stored, *_) = resolved
    try:
        parts = build(stored, ranges)
    except retrieve.NotAcceptable as exc:
        return text_answer(str(exc), 406)
    except retrieve.FrameMissing as exc:
        return text_answer(str(exc), 404)
    except (integrity.IntegrityError, FileNotFoundError) as exc:
        return _damaged(request, stored, exc, f"dicomweb {what}")
    boundary = retrieve.boundary_new()
    response = StreamingHttpResponse(
        _receipt(
            parts.stream(boundary),
            request=request,
            access=access,
            images=images(),
            nbytes=parts.nbytes,
            key_parts=(stored.sop_instance_uid, what),
            where=f"dicomweb {what}",
        ),
        content_type=retrieve.multipart_content_type("application/octet-stream", boundary),
    )
    return response


@require_GET
@api_view
def frames(
    request: HttpRequest, study: str, series: str, instance: str, numbers: str
) -> HttpResponseBase:
    try:
        wanted = retrieve.frame_numbers(numbers)
    except ValueError as exc:
        return text_answer(f"Not a frame list: {exc}.", 400)

    def build(stored: Instance, ranges: list[Any]) -> retrieve.Parts:
        syntax = retrieve.pixels_syntax(ranges, stored.transfer_syntax_uid)
        return retrieve.frames_get(stored, wanted, syntax)

    return _pixels_answer(
        request,
        study,
        series,
        instance,
        build,
        what="frames " + ",".join(str(n) for n in wanted)[:200],
        # As the viewer counts: an image on its first frame.
        images=lambda: 1 if 1 in wanted else 0,
    )


@require_GET
@api_view
def bulk(
    request: HttpRequest, study: str, series: str, instance: str, tag: str
) -> HttpResponseBase:
    tag = tag.upper()
    if len(tag) != 8 or any(c not in "0123456789ABCDEF" for c in tag):
        return text_answer("A bulk data path ends in a tag of 8 hexadecimal digits.", 400)

    def build(stored: Instance, ranges: list[Any]) -> retrieve.Parts:
        syntax = None
        if tag == retrieve.PIXEL_DATA_TAG:
            syntax = retrieve.pixels_syntax(ranges, stored.transfer_syntax_uid)
        elif not any(retrieve.octet_range(media) for media in ranges):
            raise retrieve.NotAcceptable("Bulk data is sent as application/octet-stream.")
        return retrieve.bulk_get(stored, tag, syntax)

    return _pixels_answer(
        request,
        study,
        series,
        instance,
        build,
        what=f"bulk {tag}",
        images=lambda: 1 if tag == retrieve.PIXEL_DATA_TAG else 0,
    )


# --- STOW-RS ----------------------------------------------------------------------------------------


@_api_view(writes=True)
def stow_studies(request: HttpRequest) -> HttpResponse:
    # The STOW-RS module (and the ingest, which loads pydicom) is imported by the first store,
    # not with the URLs: a web worker serving pages loads no pixel code.
    from . import stow

    return stow.stow(request, _base_url(request))


@_api_view(writes=True)
def stow_study(request: HttpRequest, study: str) -> HttpResponse:
    if bad := uids_refused(study):
        return bad
    from . import stow  # as in stow_studies

    return stow.stow(request, _base_url(request), study)


# --- the resources, by method --------------------------------------------------------------------

studies = _by_method(GET=qido_studies, HEAD=qido_studies, POST=stow_studies)
study = _by_method(GET=wado_study, POST=stow_study)
