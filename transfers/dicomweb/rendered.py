"""WADO-RS rendered and thumbnail resources (PS3.18 §10.4.1.1.3-4, media types §8.7.4, query
parameters §8.3.5): one frame as a consumer image, `image/jpeg` (the default) or `image/png`.

Nothing is decoded here: the frame's values come from the viewer's render cache
(`transfers.viewer.render.frame_render_get`), which on a miss decodes the stored copy through
the integrity-checked reader and the bounded DICOM reader, under the viewer's frame-size caps,
exactly as the viewer's own frame endpoint does in a web request, and keeps the render for the
next look. This module only windows those values to 8 bits, scales and encodes them:

- the default window is the viewer's (the file's first window or VOI LUT range, else one taken
  from the data; MONOCHROME1 inverted), with the viewer's formula, so a default render has the
  viewer's pixels; `window=center,width,function` (PS3.18 §8.3.5.1.3) overrides it for grey
  images with the VOI LUT functions of PS3.3 C.11.2.1.2 (`linear`, `linear-exact`, `sigmoid`;
  colour images are shown as they are);
- `viewport=vw,vh` scales the image to the largest size that fits, aspect kept, each side at
  most `MAX_VIEWPORT`; a thumbnail without one fits in the viewer's 128 px box;
- `quality` (1-100) is the JPEG quality (PNG is lossless and ignores it).

A thumbnail shows what the viewer's thumbnails show: a series' middle image (middle frame), a
study's first series that has an image. With no parameters the series' stored thumbnail is sent
as it is (PNG) or re-encoded (JPEG).

Access is the frames' (`scope.study_for` with the view need); like frames, an answer is not
audited on its own and is metered once per request, as `views` meters frames. (Only `urls`
may import `views`, so the few helpers this needs are written out here.)
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.http import HttpRequest, HttpResponse, QueryDict
from django.views.decorators.http import require_GET

from .. import integrity
from ..access import StudyAccess
from ..api import api_view
from ..models import Instance, Series
from ..viewer.render import (
    THUMBNAIL_SIZE,
    RenderedFrame,
    _middle_image,
    frame_render_get,
    frame_values,
    thumbnail_get,
)
from .accept import AcceptError, accept_parse
from .answers import delivery_meter, text_answer, uids_refused
from .scope import Need, study_for

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# numpy and Pillow are imported inside the functions that make images: the URL configuration
# imports these views, and a web worker serving pages loads no pixel code
# (tests/relay/test_lean_imports.py).

JPEG = "image/jpeg"
PNG = "image/png"
MAX_VIEWPORT = 4096
DEFAULT_QUALITY = 90
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
# Rows windowed at a time: memory holds the 8-bit image plus this many rows as float32.
ROWS_PER_BLOCK = 256


class BadParameter(ValueError):
    """A query parameter that cannot be used (400, with this text)."""


class NotAcceptable(Exception):
    """No acceptable image type (406, with this text)."""


@dataclass(frozen=True)
class Params:
    viewport: tuple[int, int] | None = None
    quality: int = DEFAULT_QUALITY
    window: tuple[float, float, str] | None = None

    @property
    def default(self) -> bool:
        return self.viewport is None and self.window is None


# --- the request --------------------------------------------------------------------------------


def media_choose(header: str | None) -> str:
    """image/jpeg or image/png, from the best range that allows one (no header: JPEG)."""
    try:
        ranges = accept_parse(header)
    except AcceptError as exc:
        raise BadParameter(f"The Accept header cannot be read: {exc}.") from None
    for media in ranges:
        for candidate in (JPEG, PNG):
            if media.matches(candidate):
                return candidate
    raise NotAcceptable(f"Rendered images are sent as {JPEG} or {PNG}.")


def _one(query: QueryDict, name: str) -> str | None:
    values = query.getlist(name)
    if len(values) > 1:
        raise BadParameter(f"{name} is given more than once.")
    return values[0].strip() if values else None


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadParameter(f"{name} must be numbers: {text[:20]!r} is not one.") from None
    if not math.isfinite(value):
        raise BadParameter(f"{name} must be finite numbers.")
    return value


def params_parse(query: QueryDict) -> Params:
    """viewport, quality and window as PS3.18 §8.3.5 writes them; BadParameter otherwise.
    Other rendering parameters (annotation, charset, iccprofile) are not applied."""
    viewport = None
    if (text := _one(query, "viewport")) is not None:
        items = text.split(",")
        if len(items) == 6:
            raise BadParameter("viewport source regions (sx,sy,sw,sh) are not supported.")
        if len(items) != 2 or not all(item.strip().isdigit() for item in items):
            raise BadParameter("viewport is two whole numbers: width,height.")
        width, height = (int(item) for item in items)
        if not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
            raise BadParameter(f"viewport width and height are 1 to {MAX_VIEWPORT}.")
        viewport = (width, height)
    quality = DEFAULT_QUALITY
    if (text := _one(query, "quality")) is not None:
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise BadParameter("quality is a whole number from 1 to 100.")
        quality = int(text)
    window = None
    if (text := _one(query, "window")) is not None:
        items = [item.strip() for item in text.split(",")]
        if len(items) not in (2, 3):
            raise BadParameter("window is center,width,function.")
        center = _number(items[0], "window center and width")
        breadth = _number(items[1], "window center and width")
        function = items[2].lower() if len(items) == 3 else "linear"
        if function not in WINDOW_FUNCTIONS:
            raise BadParameter(f"the window function is one of {', '.join(WINDOW_FUNCTIONS)}.")
        if breadth < 1 if function == "linear" else breadth <= 0:
            raise BadParameter(
                "the window width must be at least 1 (linear) or above 0 (linear-exact, sigmoid)."
            )
        window = (center, breadth, function)
    return Params(viewport=viewport, quality=quality, window=window)


# --- the image ----------------------------------------------------------------------------------


def _windowed(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """8-bit grey of `values` through a VOI LUT function (PS3.3 C.11.2.1.2), block by block.

    "viewer" is the viewer's own formula (its default window); the others are the standard's."""
    import numpy as np

    out = np.empty(values.shape, dtype=np.uint8)
    for start in range(0, values.shape[0], ROWS_PER_BLOCK):
        x = values[start : start + ROWS_PER_BLOCK].astype(np.float32)
        if function == "viewer":
            y = (x - np.float32(center - width / 2)) * np.float32(255.0 / width)
        elif function == "linear" and width == 1:  # a threshold at center - 0.5
            y = np.where(x <= np.float32(center - 0.5), np.float32(0), np.float32(255))
        elif function == "linear":
            y = ((x - np.float32(center - 0.5)) / np.float32(width - 1) + np.float32(0.5)) * 255
        elif function == "linear-exact":
            y = ((x - np.float32(center)) / np.float32(width) + np.float32(0.5)) * 255
        else:  # sigmoid; far below the center exp() overflows to inf, which is black
            with np.errstate(over="ignore"):
                y = 255 / (1 + np.exp(np.float32(-4 / width) * (x - np.float32(center))))
        out[start : start + ROWS_PER_BLOCK] = np.clip(y, 0, 255).astype(np.uint8)
    return out


def frame_image(rendered: RenderedFrame, window: tuple[float, float, str] | None) -> Image.Image:
    """The frame as an 8-bit image, windowed as the viewer does unless `window` says otherwise."""
    import numpy as np
    from PIL import Image

    meta = rendered.meta
    values = frame_values(rendered)
    if meta["kind"] == "rgb":
        return Image.fromarray(np.ascontiguousarray(values), mode="RGB")
    if window is None:
        center, width = float(meta["window_center"]), max(float(meta["window_width"]), 1e-6)
        gray = _windowed(values, center, width, "viewer")
    else:
        gray = _windowed(values, *window)
    if meta["invert"]:
        gray = 255 - gray
    return Image.fromarray(gray, mode="L")


def _fit(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    """The largest image that fits in `box` with the same aspect (up or down)."""
    from PIL import Image

    scale = min(box[0] / image.width, box[1] / image.height)
    size = (
        max(1, min(box[0], round(image.width * scale))),
        max(1, min(box[1], round(image.height * scale))),
    )
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def encode(image: Image.Image, media: str, quality: int) -> bytes:
    out = io.BytesIO()
    if media == PNG:
        image.save(out, format="PNG")
    else:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# --- the resources ------------------------------------------------------------------------------


def _instance_find(access: StudyAccess, series: str, instance: str) -> Instance | None:
    return (
        Instance.objects.filter(
            series__study=access.study,
            series__series_instance_uid=series,
            sop_instance_uid=instance,
        )
        .select_related("series")
        .first()
    )


def _frame_number(text: str) -> int:
    if not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise BadParameter("A rendered frame is one frame number, counted from 1.")
    return int(text)


def _answer(
    request: HttpRequest,
    access: StudyAccess,
    instance: Instance,
    frame: int,
    *,
    params: Params,
    media: str,
    thumbnail: bool,
    stored_thumbnail: Series | None = None,
) -> HttpResponse:
    """Frame `frame` (0-based) of `instance`, rendered, metered once."""
    from PIL import Image

    if instance.rows is None:
        return text_answer("This instance has no image to render.", 404)
    if frame >= max(instance.number_of_frames, 1):
        return text_answer(f"This instance has {max(instance.number_of_frames, 1)} frame(s).", 404)
    rendered = frame_render_get(instance, frame)
    error = rendered.meta["error"]
    if error in ("The stored image is missing", "The stored image is damaged"):
        if error.endswith("missing"):
            # (A damaged copy was recorded, and staff told, by the render code.)
            integrity.integrity_failure(
                instance, "dicomweb rendered", request, key="", reason="missing from storage"
            )
        return text_answer(
            "A stored copy of this image is damaged or missing; staff have been told.", 500
        )
    if error:
        return text_answer(f"This image cannot be rendered: {error}.", 500)
    if stored_thumbnail is not None and params.default:
        # The viewer's stored thumbnail of this series: the same image, already made.
        png = thumbnail_get(stored_thumbnail)
        if media == PNG:
            body = png
        else:
            with Image.open(io.BytesIO(png)) as stored:
                body = encode(stored.copy(), media, params.quality)
    else:
        image = frame_image(rendered, params.window)
        if params.viewport is not None:
            image = _fit(image, params.viewport)
        elif thumbnail:
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        body = encode(image, media, params.quality)
    what = "thumbnail" if thumbnail else "rendered"
    # Metered as frames are: once per request, an image on its first frame (a thumbnail is
    # not an image delivered).
    delivery_meter(
        request,
        access,
        images=1 if frame == 0 and not thumbnail else 0,
        nbytes=len(body),
        key_parts=(instance.sop_instance_uid, f"{what} {frame + 1}"),
    )
    return HttpResponse(body, content_type=media)


def _rendered(
    request: HttpRequest,
    study: str,
    series: str | None = None,
    instance: str | None = None,
    frame_text: str | None = None,
    *,
    thumbnail: bool,
) -> HttpResponse:
    if bad := uids_refused(*(uid for uid in (study, series, instance) if uid is not None)):
        return bad
    try:
        media = media_choose(request.headers.get("Accept"))
        params = params_parse(request.GET)
        frame = _frame_number(frame_text) - 1 if frame_text is not None else None
    except BadParameter as exc:
        return text_answer(str(exc), 400)
    except NotAcceptable as exc:
        return text_answer(str(exc), 406)
    access = study_for(request, study, need=Need.VIEW)
    stored_series: Series | None = None
    if instance is not None:
        assert series is not None
        found = _instance_find(access, series, instance)
        if found is None:
            return text_answer("No such series or instance in this study.", 404)
        if frame is None:
            # A rendered instance is its first frame; its thumbnail, as the viewer's, the middle.
            frame = max(found.number_of_frames, 1) // 2 if thumbnail else 0
    else:
        candidates = Series.objects.filter(study=access.study).select_related("study__facility")
        if series is not None:
            candidates = candidates.filter(series_instance_uid=series)
        found = None
        for stored_series in candidates.order_by("series_number", "created_at"):
            found, frame = _middle_image(stored_series)
            if found is not None:
                break
        if found is None:
            return text_answer("No image to show in this study or series.", 404)
    assert frame is not None
    return _answer(
        request,
        access,
        found,
        frame,
        params=params,
        media=media,
        thumbnail=thumbnail,
        stored_thumbnail=stored_series if instance is None else None,
    )


@require_GET
@api_view
def instance_rendered(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponse:
    return _rendered(request, study, series, instance, thumbnail=False)


@require_GET
@api_view
def frame_rendered(
    request: HttpRequest, study: str, series: str, instance: str, numbers: str
) -> HttpResponse:
    return _rendered(request, study, series, instance, numbers, thumbnail=False)


@require_GET
@api_view
def study_thumbnail(request: HttpRequest, study: str) -> HttpResponse:
    return _rendered(request, study, thumbnail=True)


@require_GET
@api_view
def series_thumbnail(request: HttpRequest, study: str, series: str) -> HttpResponse:
    return _rendered(request, study, series, thumbnail=True)


@require_GET
@api_view
def instance_thumbnail(
    request: HttpRequest, study: str, series: str, instance: str
) -> HttpResponse:
    return _rendered(request, study, series, instance, thumbnail=True)


@require_GET
@api_view
def frame_thumbnail(
    request: HttpRequest, study: str, series: str, instance: str, numbers: str
) -> HttpResponse:
    return _rendered(request, study, series, instance, numbers, thumbnail=True)
