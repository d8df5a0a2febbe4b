"""The study viewer: its page and the data the page's JavaScript loads (static/js/viewer/main.js
and its modules).

Two doors lead in, the same code behind both: `studies/<uuid>/view/` for signed-in users and
`p/<token>/studies/<uuid>/view/` for a patient whose session verified the link's second factor.
Every request, page or data, asks `study_access` first, so a share revoked while someone looks
stops the next frame. Besides the page, study.json, frames and thumbnails: geometry.json (where
each image lies, for synchronized scrolling, reference lines and the cine rate; read from the
stored headers once and cached under the file's hash) and tags/<sop>/ (the tag browser: one
image's header without its pixels, audited). Images are named by their SOP Instance UID and
series by their Series Instance UID, always looked up inside the study that access was checked
for: a UID of another study (even one the same person may see) answers 404 here.

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
from typing import IO, Any, cast
from uuid import UUID

from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import patch_cache_control, patch_vary_headers
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from portal.audit import audit_record
from portal.models import AuditAction, User

from .. import integrity
from ..access import StudyAccess, study_access
from ..deliveries import DeliveryKind, delivery_announce, receiving_facility_of
from ..models import Instance, Series, Share, Study
from ..reports import reports_visible
from ..sharing.services import share_open
from .decode import DecodeError, dataset_read, frame_meta, number_of_frames
from .render import frame_render_get, thumbnail_get, value_itemsize

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
    by_series = _stack_rows(study)
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
        "series": [_series_json(s, by_series.get(s.pk, []), base) for s in series_list],
        # Asked for once the first frame is on its way: reading every header takes time.
        "geometry_url": base + "geometry.json",
        "tags_url": base + "tags/{sop}/",
    }


def _stacks(study: Study) -> tuple[list[Series], dict[int, list[Instance]]]:
    """The study's series, and the images of each in the order the viewer shows them."""
    series_list = list(study.series.all())
    by_series: dict[int, list[Instance]] = {s.pk: [] for s in series_list}
    # Objects without Rows (a structured report, a PDF filed in an image series) have no frames.
    images = (
        Instance.objects.filter(series__study=study, rows__isnull=False)
        .only(
            "series_id",
            "sop_instance_uid",
            "instance_number",
            "number_of_frames",
            "rows",
            "columns",
            "storage_key",
            "size_bytes",
            "sha256",
        )
        .order_by("series_id", "instance_number", "id")
    )
    for instance in images:
        by_series[instance.series_id].append(instance)
    for instances in by_series.values():
        instances.sort(key=lambda i: _shown_order(i.instance_number, i.pk))
    return series_list, by_series


def _shown_order(number: int | None, pk: int) -> tuple[bool, int, int]:
    """Where an image stands in its series in the viewer (study.json, geometry.json): by
    Instance Number, the unnumbered ones after the numbered ones in the order they arrived."""
    return (number is None, number or 0, pk)


def _stack_rows(study: Study) -> dict[int, list[tuple[str, int | None, int]]]:
    """(SOP Instance UID, Instance Number, frames) of every image, by series, in the viewer's
    order (`_shown_order`, as `_stacks`). Plain rows rather than model objects: the page waits for this, and a 300-slice CT
    built as Instance objects took half of the page's time on the server."""
    rows = (
        Instance.objects.filter(series__study=study, rows__isnull=False)
        .order_by("series_id", "instance_number", "id")
        .values_list("series_id", "sop_instance_uid", "instance_number", "number_of_frames", "id")
    )
    by_series: dict[int, list[tuple[str, int | None, int, int]]] = {}
    for series_id, uid, number, frames, pk in rows:
        by_series.setdefault(series_id, []).append((uid, number, frames, pk))
    result: dict[int, list[tuple[str, int | None, int]]] = {}
    for series_id, images in by_series.items():
        images.sort(key=lambda i: _shown_order(i[1], i[3]))
        result[series_id] = [(uid, number, frames) for uid, number, frames, _ in images]
    return result


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


def _series_json(
    series: Series, images: list[tuple[str, int | None, int]], base: str
) -> dict[str, Any]:
    return {
        "uid": series.series_instance_uid,
        "number": series.series_number,
        "modality": series.modality,
        "description": series.description,
        "thumbnail_url": f"{base}thumbs/{series.series_instance_uid}/",
        "instances": [
            {"uid": uid, "number": number, "frames": max(frames, 1)}
            for uid, number, frames in images
        ],
    }


# --- geometry.json ------------------------------------------------------------------------------


@require_GET
@never_cache
def viewer_geometry_json(request: HttpRequest, study_uuid: UUID) -> JsonResponse:
    return _geometry_response(_access(request, study_uuid, None))


@require_GET
@never_cache
def patient_viewer_geometry_json(
    request: HttpRequest, token: str, study_uuid: UUID
) -> JsonResponse:
    return _geometry_response(_access(request, study_uuid, token))


def _geometry_response(access: StudyAccess) -> JsonResponse:
    """Where each image lies in the patient, and each series' Frame of Reference and frame rate:
    for synchronized scrolling, reference lines and the cine rate. Not audited, like a frame:
    positions and UIDs, a part of the page view that was."""
    series_list, by_series = _stacks(access.study)
    geometry = _geometry_of([i for instances in by_series.values() for i in instances])
    return JsonResponse(
        {"series": [_series_geometry(s, by_series[s.pk], geometry) for s in series_list]}
    )


def _series_geometry(
    series: Series, instances: list[Instance], geometry: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    frame_of_reference = ""
    fps: float | None = None
    for i in instances:
        g = geometry.get(i.sha256) or {}
        frame_of_reference = frame_of_reference or g.get("for", "")
        fps = fps or g.get("fps")
    return {
        "uid": series.series_instance_uid,
        "frame_of_reference": frame_of_reference,
        "fps": fps,
        # In the order of study.json's instances, one entry each.
        "instances": [_geometry_json(i, geometry.get(i.sha256) or {}) for i in instances],
    }


def _geometry_json(instance: Instance, geometry: dict[str, Any]) -> dict[str, Any]:
    # One position per frame (a list of lists for a multi-frame object); the orientation and
    # pixel spacing once when every frame shares them (the common case), else one per frame.
    data: dict[str, Any] = {"rows": instance.rows, "columns": instance.columns}
    for key in ("ipp", "iop", "ps"):
        if geometry.get(key) is not None:
            data[key] = geometry[key]
    return data


# --- reading the geometry ----------------------------------------------------------------------

GEOMETRY_CACHE_SECONDS = 7 * 24 * 3600


def _geometry_of(instances: list[Instance]) -> dict[str, dict[str, Any]]:
    """Each instance's plane geometry and frame rate, by its SHA-256.

    Read from the stored headers once and cached under the file's hash: a stored file never
    changes, so the entry never goes stale. Only the header is read (no pixels, no integrity
    check of the whole file: what is read here are positions, not what the user is shown)."""
    keys = {i.sha256: f"viewer-geometry:{i.sha256}" for i in instances if i.sha256}
    found = cache.get_many(list(keys.values()))
    result: dict[str, dict[str, Any]] = {}
    missing: dict[str, dict[str, Any]] = {}
    for instance in instances:
        key = keys.get(instance.sha256)
        if key is None:
            continue
        if key in found:
            result[instance.sha256] = found[key]
        elif instance.sha256 not in result:
            result[instance.sha256] = missing[key] = _geometry_read(instance)
    if missing:
        cache.set_many(missing, GEOMETRY_CACHE_SECONDS)
    return result


def _rounded(values: list[float] | None, digits: int = 4) -> list[float] | None:
    return None if values is None else [round(v, digits) for v in values]


def _geometry_read(instance: Instance) -> dict[str, Any]:
    try:
        with integrity.instance_open(instance, at_end=False) as reader:
            ds = dataset_read(cast(IO[bytes], reader))
            frames = max(number_of_frames(ds), 1)
            metas = [frame_meta(ds, f) for f in range(frames)]
            frame_of_reference = str(ds.get("FrameOfReferenceUID", "") or "")[:64]
            fps = _frame_rate(ds)
    except (FileNotFoundError, DecodeError):
        return {}
    except Exception:
        log.exception("the geometry of instance %s could not be read", instance.pk)
        return {}
    positions = [_rounded(m["image_position"]) for m in metas]
    orientations = [_rounded(m["image_orientation"], 6) for m in metas]
    spacings = [_rounded(m["pixel_spacing"], 6) for m in metas]
    spacing_kinds = {m["spacing_kind"] for m in metas}

    def once_or_each(values: list[Any]) -> Any:
        if all(v is None for v in values):
            return None
        if frames == 1 or all(v == values[0] for v in values):
            return values[0]
        return values

    return {
        "for": frame_of_reference,
        "fps": fps,
        "ipp": positions[0] if frames == 1 else (positions if any(positions) else None),
        "iop": once_or_each(orientations),
        # Imager Pixel Spacing is at the detector: no use for planes in the patient.
        "ps": once_or_each(spacings) if spacing_kinds == {"PixelSpacing"} else None,
    }


def _frame_rate(ds: Any) -> float | None:
    """Frames per second the file asks for: Recommended Display Frame Rate, else 1000 / Frame
    Time (also in the cine functional group of an enhanced object)."""
    for keyword in ("RecommendedDisplayFrameRate", "CineRate"):
        try:
            rate = float(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            rate = 0
        if 0 < rate <= 1000:
            return round(rate, 3)
    sources = [ds]
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            sources += [item for item in shared[0].get("CineSequence", []) or []]
    except Exception:  # noqa: S110 - a malformed group is as good as none
        pass
    for source in sources:
        try:
            frame_time = float(source.get("FrameTime") or 0)
        except (TypeError, ValueError):
            frame_time = 0
        if frame_time > 0:
            return round(1000 / frame_time, 3)
    return None


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
    itemsize = value_itemsize(str(meta["dtype"]))
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


# --- the tag browser ----------------------------------------------------------------------------

TAG_VALUE_CHARS = 200  # a longer value is cut, with its full length said
TAG_MAX_ELEMENTS = 5000  # a header with more (deeply nested sequences) is cut
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


@require_GET
@never_cache
def viewer_tags(request: HttpRequest, study_uuid: UUID, sop_uid: str) -> JsonResponse:
    return _tags(request, _access(request, study_uuid, None), sop_uid)


@require_GET
@never_cache
def patient_viewer_tags(
    request: HttpRequest, token: str, study_uuid: UUID, sop_uid: str
) -> JsonResponse:
    return _tags(request, _access(request, study_uuid, token), sop_uid)


def _tags(request: HttpRequest, access: StudyAccess, sop_uid: str) -> JsonResponse:
    """One image's header as rows of (tag, keyword, VR, value), without its pixel data.

    Looked up like a frame (inside the study access was checked for). Audited, unlike a frame:
    the header holds more about the patient than the page shows."""
    instance = Instance.objects.filter(series__study=access.study, sop_instance_uid=sop_uid).first()
    if instance is None:
        raise Http404("No such image in this study.")
    try:
        with integrity.instance_open(instance, at_end=False) as reader:
            ds = dataset_read(cast(IO[bytes], reader))
            rows: list[dict[str, str]] = []
            _tag_rows(getattr(ds, "file_meta", None) or [], rows, depth=0)
            _tag_rows(ds, rows, depth=0)
            reader.verify()
    except FileNotFoundError:
        raise Http404("The stored image is missing.") from None
    except DecodeError as exc:
        return JsonResponse({"error": str(exc)}, status=422)
    except integrity.IntegrityError as exc:
        integrity.integrity_failure(instance, "viewer", request, key=exc.key, reason=exc.reason)
        return JsonResponse({"error": "The stored image is damaged."}, status=409)
    audit_record(
        action=AuditAction.STUDY_VIEW,
        request=request,
        study=access.study,
        actor_facility=receiving_facility_of(share=access.share, user=request.user),
        detail={
            "via": "tags",
            "sop": sop_uid,
            **({"share": str(access.share.uuid)} if access.share else {}),
        },
    )
    return JsonResponse({"tags": rows, "truncated": len(rows) >= TAG_MAX_ELEMENTS})


def _tag_rows(ds: Any, rows: list[dict[str, str]], *, depth: int) -> None:
    for element in ds:
        if len(rows) >= TAG_MAX_ELEMENTS:
            return
        if element.tag == 0x7FE00010 or element.tag.group == 0x7FE0:
            continue  # the pixels are the image, not a tag to read
        tag = f"({element.tag.group:04X},{element.tag.element:04X})"
        prefix = "> " * depth
        vr = str(element.VR or "")
        if vr == "SQ":
            items = element.value or []
            rows.append(
                {
                    "tag": prefix + tag,
                    "keyword": element.keyword or "",
                    "vr": vr,
                    "value": f"{len(items)} item{'' if len(items) == 1 else 's'}",
                }
            )
            for item in items:
                _tag_rows(item, rows, depth=depth + 1)
            continue
        rows.append(
            {
                "tag": prefix + tag,
                "keyword": element.keyword or "",
                "vr": vr,
                "value": _tag_value(element, vr),
            }
        )


def _tag_value(element: Any, vr: str) -> str:
    from pydicom.multival import MultiValue  # the header is read: pydicom is loaded already

    try:
        value = element.value
    except Exception:
        return "(unreadable)"
    if vr in BINARY_VRS or isinstance(value, bytes | bytearray):
        size = len(value) if value is not None else 0
        return f"(binary, {size} bytes)"
    if value is None:
        return ""
    text = (
        "\\".join(str(v) for v in value)
        if isinstance(value, list | tuple | MultiValue)
        else str(value)
    )
    text = text.replace("\x00", "").strip()
    if len(text) > TAG_VALUE_CHARS:
        return f"{text[:TAG_VALUE_CHARS]}… ({len(text)} characters)"
    return text


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
    # fetched in memory while the page is open, so a frame is asked for once per page view; each
    # ask is served from the stored render with one read (one GetObject on S3, render._read),
    # after the access check, never by redirect to a bucket URL that would skip it.
    patch_cache_control(response, no_store=True)
    patch_vary_headers(response, ["Cookie"])
