"""Downloads of a whole study as IHE PDI media in a ZIP, and of reports, for recipients and
patients.

Each download asks `study_access` first and then whether the share allows downloads (the
facility that holds the study always may). The ZIP is streamed as it is built: nothing of the
study is copied to disk or memory. The audit trail records the download when it starts; the
sender's "downloaded" receipt is written when the last byte has gone out, so an aborted
download is audited but not reported as delivered.

The ZIP carries the disc viewer (INDEX.HTM, VIEWER/) unless asked for with `?viewer=0`: the
DICOM files, DICOMDIR, README.TXT and the reports only, for an import into a PACS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.files.storage import storages
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from portal.access import AuthedRequest
from portal.audit import audit_record
from portal.models import AuditAction, User

from .. import integrity
from ..access import StudyAccess, study_access
from ..deliveries import DeliveryKind, delivery_announce, receiving_facility_of
from ..models import ExportStatus, Instance, MediaExport, Study
from ..reports import reports_visible
from ..sharing.services import share_downloaded
from .discs import MediaError, media_export_create
from .export import ExportError, export_plan, zip_size, zip_stream

log = logging.getLogger(__name__)


@require_GET
@login_required
def study_download(request: HttpRequest, study_uuid: str) -> HttpResponseBase:
    return _study_zip(request, study_access(request, study_uuid))


@require_GET
@never_cache
def patient_study_download(request: HttpRequest, token: str, study_uuid: str) -> HttpResponseBase:
    return _study_zip(request, study_access(request, study_uuid, token=token))


@require_POST
@login_required
def media_export_new(request: AuthedRequest, study_uuid: str) -> HttpResponseBase:
    access = study_access(request, study_uuid)
    try:
        export = media_export_create(access=access, by=request.user)
    except MediaError as exc:
        messages.error(request, str(exc))
        return redirect("study_detail", study_uuid=access.study.uuid)
    return redirect("media_export", study_uuid=access.study.uuid, export_uuid=export.uuid)


def _get_export(
    request: AuthedRequest, study_uuid: str, export_uuid: str
) -> tuple[StudyAccess, MediaExport]:
    """The disc image this user asked for, of a study they may still open; else 404."""
    access = study_access(request, study_uuid)
    export = MediaExport.objects.filter(
        study=access.study, uuid=export_uuid, requested_by=request.user
    ).first()
    if export is None:
        raise Http404("No such disc image.")
    return access, export


@require_GET
@login_required
def media_export_page(
    request: AuthedRequest, study_uuid: str, export_uuid: str
) -> HttpResponseBase:
    access, export = _get_export(request, study_uuid, export_uuid)
    building = export.status in (ExportStatus.QUEUED, ExportStatus.BUILDING)
    if not building:  # not once per refresh of the progress page
        audit_record(
            action=AuditAction.STUDY_VIEW,
            request=request,
            study=access.study,
            actor_facility=receiving_facility_of(share=access.share, user=request.user),
            detail={"page": "disc image", "export": str(export.uuid)},
        )
    return render(
        request,
        "transfers/media_export.html",
        {"study": access.study, "export": export, "building": building},
    )


@require_GET
@login_required
def media_export_download(
    request: AuthedRequest, study_uuid: str, export_uuid: str
) -> HttpResponseBase:
    access, export = _get_export(request, study_uuid, export_uuid)
    if export.status != ExportStatus.READY or not access.can_download:
        raise Http404("The disc image is not ready.")
    _audit_download(request, access, "iso", export.images, export.image_bytes, media=export.media)
    what = f"{export.media} image of {export.images} images ({export.image_bytes / 1e6:.1f} MB)"
    response = StreamingHttpResponse(
        _with_receipt(
            _stored_chunks(export.storage_key),
            access=access,
            what=what,
            user=request.user,
            kind=DeliveryKind.ISO,
            images=export.images,
            image_bytes=export.image_bytes,
            key_parts=(export.uuid,),
        ),
        content_type="application/x-iso9660-image",
    )
    return _attachment(response, access.study, "iso", export.total_bytes)


def _stored_chunks(key: str, size: int = 1024 * 1024) -> Iterator[bytes]:
    with storages["default"].open(key) as f:
        while chunk := f.read(size):
            yield chunk


def _refused() -> HttpResponseBase:
    return HttpResponse(
        "This share lets you view the study but not download it. Ask the sender for a copy.",
        status=403,
        content_type="text/plain; charset=utf-8",
    )


def _study_zip(request: HttpRequest, access: StudyAccess) -> HttpResponseBase:
    if not access.can_download:
        return _refused()
    study = access.study
    try:
        plan = export_plan(studies=[study], reports_of=lambda _: reports_visible(access))
    except ExportError as exc:
        # A stored copy is missing or damaged: say so plainly; nothing half-made is sent.
        log.error("export of study %s failed: %s", study.uuid, exc)
        return HttpResponse(
            f"This study cannot be downloaded right now: {exc}",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    if request.GET.get("viewer") == "0":
        # For a PACS import: the DICOM file-set alone, without INDEX.HTM and VIEWER/ (whose
        # frames are most of the work and more than half of the bytes of a download).
        plan = plan.without_viewer()
    _audit_download(request, access, "zip", plan.images, plan.image_bytes)
    response = StreamingHttpResponse(
        _with_receipt(
            _integrity_checked(zip_stream(plan), request=request, where="zip"),
            access=access,
            what=f"ZIP of {plan.images} images ({plan.image_bytes / 1e6:.1f} MB)",
            user=request.user if request.user.is_authenticated else None,  # type: ignore[arg-type]
            kind=DeliveryKind.ZIP,
            images=plan.images,
            image_bytes=plan.image_bytes,
            key_parts=(study.uuid, plan.images, plan.image_bytes),
        ),
        content_type="application/zip",
    )
    return _attachment(response, study, "zip", zip_size(plan))


def _integrity_checked(
    chunks: Iterator[bytes], *, request: HttpRequest, where: str
) -> Iterator[bytes]:
    """The download's bytes; a stored object found damaged on the way (integrity.IntegrityError)
    is audited, staff are told, and the error goes on up: the server drops the connection
    short of the Content-Length, so the client has a broken download, never a valid ZIP with a
    damaged image in it, and no receipt or delivery is recorded."""
    try:
        yield from chunks
    except integrity.IntegrityError as exc:
        instance = Instance.objects.filter(storage_key=exc.key).first()
        integrity.integrity_failure(instance, where, request, key=exc.key, reason=exc.reason)
        raise


def _audit_download(
    request: HttpRequest,
    access: StudyAccess,
    fmt: str,
    images: int,
    image_bytes: int,
    **extra: str,
) -> None:
    """The study_download event, written when a download starts."""
    detail: dict[str, Any] = {"format": fmt, **extra, "images": images, "bytes": image_bytes}
    if access.share:
        detail["share"] = str(access.share.uuid)
    audit_record(
        action=AuditAction.STUDY_DOWNLOAD,
        request=request,
        study=access.study,
        actor_facility=receiving_facility_of(share=access.share, user=request.user),
        detail=detail,
    )


def _attachment(
    response: StreamingHttpResponse, study: Study, extension: str, length: int | None
) -> StreamingHttpResponse:
    """A download's headers: its length when known, a private file name, no caching."""
    if length is not None:
        response["Content-Length"] = str(length)
    # No patient data in the file name: it ends up in download lists and browser history.
    day = study.study_date.strftime("%Y%m%d") if study.study_date else "undated"
    response["Content-Disposition"] = (
        f'attachment; filename="study-{day}-{str(study.uuid)[:8]}.{extension}"'
    )
    response["Cache-Control"] = "private, no-store"
    return response


def _with_receipt(
    chunks: Iterator[bytes],
    *,
    access: StudyAccess,
    what: str,
    user: User | None,
    kind: DeliveryKind,
    images: int,
    image_bytes: int,
    key_parts: tuple[object, ...],
) -> Iterator[bytes]:
    yield from chunks
    # Only a download that reached its last byte is a delivery: the sender's receipt, and one
    # usage record (the key makes the same content to the same recipient count once, so a
    # download started again after a broken connection is not charged twice).
    if access.share is not None:
        with transaction.atomic():
            share_downloaded(share=access.share, who=access.who, what=what)
            delivery_announce(
                kind=kind,
                share=access.share,
                study=access.study,
                user=user,
                nbytes=image_bytes,
                images=images,
                key_parts=(
                    access.share.uuid,
                    user.pk if user is not None else "patient",
                    *key_parts,
                ),
            )
