"""The study viewer: its page and the data the page's JavaScript loads (static/js/viewer/main.js
and its modules).

Two doors lead in, the same code behind both: `studies/<uuid>/view/` for signed-in users and
`p/<token>/studies/<uuid>/view/` for a patient whose session verified the link's second factor.
Every request, page or data, asks `study_access` first, so a share revoked while someone looks
stops the next frame. Images are named by their SOP Instance UID and series by their Series
Instance UID, always looked up inside the study that access was checked for: a UID of another
study (even one the same person may see) answers 404 here.

What is sent per frame is the modality values (Hounsfield units on CT) gzipped, straight from the
stored render (transfers.viewer.render), so the browser windows the image itself and dragging the window
costs no request. The page load is audited once; frames and thumbnails are not, they are parts of
that one view. Bytes sent are handed to `viewer_bytes_delivered`, which announces them as a
delivery (transfers.deliveries).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any
from uuid import UUID

import numpy as np
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import patch_cache_control, patch_vary_headers
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from portal.audit import audit_record
from portal.models import AuditAction, User

from ..access import StudyAccess, study_access
from ..deliveries import DeliveryKind, delivery_announce, receiving_facility_of
from ..models import Instance, Series, Share, Study
from ..reports import reports_visible
from ..sharing.services import share_open
from .render import frame_render_get, thumbnail_get

log = logging.getLogger(__name__)

FRAME_META_HEADER = "X-Relay-Frame"


# --- access -------------------------------------------------------------------------------------


def _access(request: HttpRequest, study_uuid: UUID, token: str | None) -> StudyAccess:
    """study_access, plus the share's own "may view" (a share may allow download only)."""
    access = study_access(request, study_uuid, token=token)
    if not access.can_view:
        raise Http404("No such study.")
    return access


def _base_url(study: Study, token: str | None) -> str:
    """The viewer page's address; the data endpoints hang below it."""
    if token is None:
        return reverse("viewer", kwargs={"study_uuid": study.uuid})
    return reverse("patient_viewer", kwargs={"token": token, "study_uuid": study.uuid})


# --- the page -----------------------------------------------------------------------------------


@require_GET
@login_required
@never_cache  # every load is audited; a cached copy would be a view nobody recorded
def viewer(request: HttpRequest, study_uuid: UUID) -> HttpResponse:
    return _viewer_page(request, _access(request, study_uuid, None), token=None)


@require_GET
@never_cache
def patient_viewer(request: HttpRequest, token: str, study_uuid: UUID) -> HttpResponse:
    try:
        access = _access(request, study_uuid, token)
    except Http404:
        # A live link whose session lapsed goes back to its second factor, as the patient's
        # list does; anything else stays the same 404 a guesser gets.
        share = Share.objects.link(token)
        if share is not None and share.studies.filter(uuid=study_uuid).exists():
            return redirect("guest_open" if share.is_guest_link else "patient_open", token=token)
        raise
    return _viewer_page(request, access, token=token)


def _viewer_page(request: HttpRequest, access: StudyAccess, *, token: str | None) -> HttpResponse:
    study = access.study
    share = access.share
    audit_record(
        action=AuditAction.STUDY_VIEW,
        request=request,
        study=study,
        actor_facility=receiving_facility_of(share=share, user=request.user),
        detail={"via": "viewer", "share": str(share.uuid) if share else None},
    )
    if share is not None and not access.is_patient and request.user.is_authenticated:
        # The sender's "opened" receipt; patients got theirs when they answered the factor.
        share_open(share=share, who=access.who, request=request, actor=request.user)  # type: ignore[arg-type]

    base = _base_url(study, token)
    if token is None:
        back_url = reverse("study_detail", kwargs={"study_uuid": study.uuid})
        download_url = reverse("study_download", kwargs={"study_uuid": study.uuid})
    else:
        studies_page = (
            "guest_studies" if share is not None and share.is_guest_link else "patient_studies"
        )
        back_url = reverse(studies_page, kwargs={"token": token})
        download_url = reverse(
            "patient_study_download", kwargs={"token": token, "study_uuid": study.uuid}
        )
    reports = []
    for report in reports_visible(access):
        kwargs: dict[str, Any] = {"study_uuid": study.uuid, "report_uuid": report.uuid}
        if token is not None:
            kwargs["token"] = token
        name = "report_download" if token is None else "patient_report_download"
        reports.append({"report": report, "url": reverse(name, kwargs=kwargs)})
    data = _study_data(access, token=token)
    return render(
        request,
        "transfers/viewer.html",
        {
            "study": study,
            "base_url": base,
            "study_json_url": base + "study.json",
            "back_url": back_url,
            "download_url": download_url if access.can_download else None,
            "reports": reports,
            "is_patient": access.is_patient,
            # In the page itself: the first frame is asked for without waiting for study.json.
            "study_data": data,
            "first_frame_url": _first_frame_url(data),
        },
    )


# --- study.json ---------------------------------------------------------------------------------


@require_GET
@never_cache
def viewer_study_json(request: HttpRequest, study_uuid: UUID) -> JsonResponse:
    return _study_json(request, _access(request, study_uuid, None), token=None)


@require_GET
@never_cache
def patient_viewer_study_json(request: HttpRequest, token: str, study_uuid: UUID) -> JsonResponse:
    return _study_json(request, _access(request, study_uuid, token), token=token)


def _study_json(request: HttpRequest, access: StudyAccess, *, token: str | None) -> JsonResponse:
    # The viewer page carries the same data and is audited; this is for a client that asks
    # for it on its own, so it is audited too.
    audit_record(
        action=AuditAction.STUDY_VIEW,
        request=request,
        study=access.study,
        actor_facility=receiving_facility_of(share=access.share, user=request.user),
        detail={"via": "study.json", **({"share": str(access.share.uuid)} if access.share else {})},
    )
    return JsonResponse(_study_data(access, token=token))


def _study_data(access: StudyAccess, *, token: str | None) -> dict[str, Any]:
    """What the viewer needs to know before the first pixel: who, what, and every stack."""
    study = access.study
    base = _base_url(study, token)
    series_list = list(study.series.all())
    by_series: dict[int, list[Instance]] = {s.pk: [] for s in series_list}
    # Objects without Rows (a structured report, a PDF filed in an image series) have no frames.
    images = (
        Instance.objects.filter(series__study=study, rows__isnull=False)
        .only("series_id", "sop_instance_uid", "instance_number", "number_of_frames", "rows")
        .order_by("series_id", "instance_number", "id")
    )
    for instance in images:
        by_series[instance.series_id].append(instance)
    for instances in by_series.values():
        # Unnumbered images after the numbered ones, in the order they arrived.
        instances.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0, i.pk))
    return {
        "study": {
            "patient_name": study.patient_name_display,
            "patient_id": study.patient_id,
            "patient_birth_date": _iso(study.patient_birth_date),
            "patient_sex": study.patient_sex,
            "study_date": _iso(study.study_date),
            "study_time": study.study_time.strftime("%H:%M") if study.study_time else "",
            "description": study.description,
            "accession_number": study.accession_number,
            "modalities": study.modality_list,
        },
        "frame_url": base + "frames/{sop}/{frame}/",
        "series": [_series_json(s, by_series[s.pk], base) for s in series_list],
    }


def _first_frame_url(data: dict[str, Any]) -> str | None:
    """The frame the viewer shows first (the first image of the first series that has one),
    which the page asks the browser to fetch while the viewer's code is still loading."""
    for series in data["series"]:
        if series["instances"]:
            uid = series["instances"][0]["uid"]
            return str(data["frame_url"]).replace("{sop}", uid).replace("{frame}", "0")
    return None


def _iso(value: Any) -> str:
    return value.isoformat() if value is not None else ""


def _series_json(series: Series, instances: list[Instance], base: str) -> dict[str, Any]:
    return {
        "uid": series.series_instance_uid,
        "number": series.series_number,
        "modality": series.modality,
        "description": series.description,
        "thumbnail_url": f"{base}thumbs/{series.series_instance_uid}/",
        "instances": [
            {
                "uid": i.sop_instance_uid,
                "number": i.instance_number,
                "frames": max(i.number_of_frames, 1),
            }
            for i in instances
        ],
    }


# --- frames -------------------------------------------------------------------------------------


@require_GET
def viewer_frame(request: HttpRequest, study_uuid: UUID, sop_uid: str, frame: int) -> HttpResponse:
    return _frame(request, _access(request, study_uuid, None), sop_uid, frame)


@require_GET
def patient_viewer_frame(
    request: HttpRequest, token: str, study_uuid: UUID, sop_uid: str, frame: int
) -> HttpResponse:
    return _frame(request, _access(request, study_uuid, token), sop_uid, frame)


def _frame(request: HttpRequest, access: StudyAccess, sop_uid: str, frame: int) -> HttpResponse:
    instance = (
        Instance.objects.filter(series__study=access.study, sop_instance_uid=sop_uid)
        .select_related("series")
        .first()
    )
    if instance is None:
        raise Http404("No such image in this study.")
    try:
        rendered = frame_render_get(instance, frame)
    except ValueError:
        raise Http404("No such frame.") from None
    response = HttpResponse(rendered.gz, content_type="application/octet-stream")
    # The browser inflates the body itself, so the client gets the raw values for free.
    response["Content-Encoding"] = "gzip"
    response[FRAME_META_HEADER] = frame_meta_header(rendered.meta)
    _no_store(response)
    viewer_bytes_delivered(
        access=access,
        instance=instance,
        frame=frame,
        nbytes=frame_value_bytes(rendered.meta),
        user=request.user if request.user.is_authenticated else None,  # type: ignore[arg-type]
    )
    return response


def frame_meta_header(meta: dict[str, Any]) -> str:
    """The meta as one line of ASCII JSON (a header value); NaN and infinities become null."""
    return json.dumps(_finite(meta), ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def frame_value_bytes(meta: dict[str, Any]) -> int:
    """How many bytes of values a frame is once inflated (what the browser receives)."""
    if meta.get("error") or not meta.get("dtype"):
        return 0
    samples = 3 if meta.get("kind") == "rgb" else 1
    itemsize = np.dtype(str(meta["dtype"])).itemsize
    return int(meta["rows"]) * int(meta["columns"]) * samples * itemsize


def viewer_bytes_delivered(
    *, access: StudyAccess, instance: Instance, frame: int, nbytes: int, user: User | None
) -> None:
    """Image bytes the viewer sent: the one call point for metering viewed data.

    Counted uncompressed, as the values delivered, so the figure does not depend on how well a
    study compresses. The key makes a frame count once per share and viewer however often it is
    fetched again; an instance counts as one image, on its first frame.
    """
    if access.share is None:
        return  # the facility's own study: not a delivery
    delivery_announce(
        kind=DeliveryKind.VIEWER,
        share=access.share,
        study=access.study,
        user=user,
        nbytes=nbytes,
        images=1 if frame == 0 else 0,
        key_parts=(
            access.share.uuid,
            user.pk if user is not None else "patient",
            instance.sop_instance_uid,
            frame,
        ),
    )


# --- thumbnails ---------------------------------------------------------------------------------


@require_GET
def viewer_thumbnail(request: HttpRequest, study_uuid: UUID, series_uid: str) -> HttpResponse:
    return _thumbnail(_access(request, study_uuid, None), series_uid)


@require_GET
def patient_viewer_thumbnail(
    request: HttpRequest, token: str, study_uuid: UUID, series_uid: str
) -> HttpResponse:
    return _thumbnail(_access(request, study_uuid, token), series_uid)


def _thumbnail(access: StudyAccess, series_uid: str) -> HttpResponse:
    series = (
        Series.objects.filter(study=access.study, series_instance_uid=series_uid)
        .select_related("study__facility")
        .first()
    )
    if series is None:
        raise Http404("No such series in this study.")
    image = thumbnail_get(series)
    content_type = "image/jpeg" if image[:3] == b"\xff\xd8\xff" else "image/png"
    response = HttpResponse(image, content_type=content_type)
    _no_store(response)
    return response


def _no_store(response: HttpResponse) -> None:
    # Frames and thumbnails are PHI: no browser or proxy keeps a copy (relay.headers does this
    # for every answer; said here too so the view stands on its own). The viewer holds what it
    # fetched in memory while the page is open.
    patch_cache_control(response, no_store=True)
    patch_vary_headers(response, ["Cookie"])
