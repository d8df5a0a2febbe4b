"""Renders for the viewer, kept in storage next to the images and made again when missing.

Per frame, one object `renders/<the image's key without "dicom/" and ".dcm">/<frame>.rly`:

    b"RLY1" | meta length (4 bytes, big-endian) | meta (JSON, UTF-8) | gzip of the frame's values

The meta is `FrameData` without its data plus `frame_meta` plus "error" (None, or why the frame
cannot be shown; then the payload is gzip of nothing). A frame that cannot be decoded is stored
too, so that a bad file costs one attempt, not one per view.

Per series, one PNG thumbnail of its middle image under the series' folder in "renders/". The PNG
carries which instance and frame it shows (a text chunk), so a thumbnail made while the series was
still arriving is made again once its middle image is another one.

Everything goes through `storages["default"]`, so renders live wherever the images live (S3 too).

Reading one back is one request: `_read` asks the storage for the object's bytes once (Relay's
storages have `read_bytes`, relay/storage.py and relay/s3.py: one GetObject on S3, a NoSuchKey
meaning "not rendered yet"), never `exists()` and then `open()`, which on S3 cost three HEADs and
a GET per frame or thumbnail (issue 18). Renders are not served by redirect to presigned bucket
URLs: a presigned URL is a bearer link to patient images that lives in browser history, proxy
logs and Referer headers for its lifetime, outside the access check and the metering that every
frame request passes (views.py), and outside the no-store and CSP headers Relay sets. Nor are they
cached on the server: a copy in Redis or in a worker's memory would not have the bucket's
encryption at rest nor be removed by the purge, and it would save only the one GET left. What
lasts across requests is the render itself in storage (a frame is decoded once, ever) and the
viewer's own in-memory cache in the browser (static/js/viewer/data.js), which holds the frames it
fetched for as long as the page is open; the answers stay `no-store`, so no copy lands on a
shared computer's disk (relay/headers.py).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import struct
import textwrap
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages

from .. import integrity
from ..models import Instance, Series, Study
from .decode import DecodeError, FrameData, dataset_frame_decode, dataset_read, frame_meta

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# numpy and Pillow are imported where values or images are made: the frame endpoint serves a
# stored render's bytes as they are, and a web worker loads no pixel code for it
# (tests/relay/test_lean_imports.py).

log = logging.getLogger(__name__)

MAGIC = b"RLY1"
# Level 1 is twice as fast as the default and the output only ~6% larger on CT.
GZIP_LEVEL = 1
THUMBNAIL_SIZE = 128
# Bump when the thumbnail's look changes, so that stored ones are made again.
THUMBNAIL_VERSION = "1"
THUMBNAIL_SOURCE_KEY = "relay-source"
FRAME_FIELDS = (
    "rows",
    "columns",
    "kind",
    "dtype",
    "min_value",
    "max_value",
    "window_center",
    "window_width",
    "invert",
)


@dataclass(frozen=True)
class RenderedFrame:
    meta: dict[str, Any]
    gz: bytes


# --- keys ---------------------------------------------------------------------------------------


def _render_dir(storage_key: str) -> str:
    name = storage_key.removeprefix("dicom/").removesuffix(".dcm")
    return f"renders/{name}"


def frame_render_key(*, storage_key: str, frame: int) -> str:
    return f"{_render_dir(storage_key)}/{frame}.rly"


def instance_render_keys(*, storage_key: str, number_of_frames: int) -> list[str]:
    """Every key a render of this instance may be stored under (for the purge)."""
    return [
        frame_render_key(storage_key=storage_key, frame=frame)
        for frame in range(max(number_of_frames, 1))
    ]


def series_thumbnail_key(series: Series) -> str:
    # The series' primary key is in the name: a study purged and sent again gets new series
    # rows, so it can never be shown the thumbnail of what was there before.
    study = series.study
    return (
        f"renders/{study.facility.uuid}/{study.study_instance_uid}/"
        f"{series.series_instance_uid}/thumbnail-{series.pk}.png"
    )


# --- storage ------------------------------------------------------------------------------------


def _storage() -> Storage:
    return storages["default"]


def _read(storage: Storage, key: str) -> bytes | None:
    """The stored object's bytes, or None when there is none: one read, no `exists()` first."""
    read_bytes = getattr(storage, "read_bytes", None)
    if read_bytes is not None:  # relay.storage.AtomicFileSystemStorage, relay.s3.AtomicS3Storage
        return cast("bytes | None", read_bytes(key))
    try:
        with storage.open(key, "rb") as fp:
            return bytes(fp.read())
    except FileNotFoundError:
        return None


def _write(storage: Storage, key: str, payload: bytes, *, replace: bool = False) -> None:
    if replace:
        storage.delete(key)
    name = storage.save(key, ContentFile(payload))
    if name != key:
        # Another worker stored the same render first (a file system storage then picks a new
        # name rather than overwrite): theirs stays, ours goes.
        storage.delete(name)


def _pack(rendered: RenderedFrame) -> bytes:
    meta = json.dumps(rendered.meta, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(meta)) + meta + rendered.gz


def _unpack(blob: bytes) -> RenderedFrame | None:
    """The stored render, or None when the object is not one (cut short, another format)."""
    if len(blob) < 8 or blob[:4] != MAGIC:
        return None
    (length,) = struct.unpack(">I", blob[4:8])
    if 8 + length > len(blob):
        return None
    try:
        meta = json.loads(blob[8 : 8 + length])
    except ValueError:
        return None
    if not isinstance(meta, dict) or "error" not in meta:
        return None
    return RenderedFrame(meta=meta, gz=blob[8 + length :])


# --- frames -------------------------------------------------------------------------------------


def frame_render_get(instance: Instance, frame: int) -> RenderedFrame:
    """The viewer's data for one frame: stored if rendered before, otherwise decoded and stored
    now. Bad pixel data gives meta["error"], never an exception; a frame index out of range
    raises ValueError."""
    if not 0 <= frame < max(instance.number_of_frames, 1):
        raise ValueError(
            f"frame {frame} is out of range (the instance has {instance.number_of_frames})"
        )
    storage = _storage()
    key = frame_render_key(storage_key=instance.storage_key, frame=frame)
    blob = _read(storage, key)
    if blob is not None:
        rendered = _unpack(blob)
        if rendered is not None:
            return rendered
        log.warning("render %s is unreadable; making it again", key)
    results, _ = _instance_render(instance, [frame], storage=storage, replace=blob is not None)
    return results[frame]


def _instance_render(
    instance: Instance, frames: list[int], *, storage: Storage, replace: bool = False
) -> tuple[dict[int, RenderedFrame], int]:
    """Decode and store the given frames of one instance, reading its file once; returns the
    renders and how many of them were stored."""
    results: dict[int, RenderedFrame] = {}
    lasting_frames: list[int] = []
    stored = 0
    try:
        # Checked against the SHA-256 recorded when it arrived once the frames are decoded,
        # before any render is kept or shown (at_end=False: the decoder would wrap the error).
        reader = integrity.instance_open(instance, storage, at_end=False)
    except FileNotFoundError:
        # Purged while someone looked: say so, store nothing (there is nothing to keep it for).
        log.warning("the image of instance %s is missing from storage", instance.pk)
        error = DecodeError("The stored image is missing", lasting=False)
        return {frame: _error_render(instance, frame, None, error) for frame in frames}, 0
    fp = cast(IO[bytes], reader)
    with reader:
        try:
            ds = dataset_read(fp)
        except DecodeError as exc:
            ds = None
            header_error: DecodeError | None = exc
        else:
            header_error = None
        for frame in frames:
            if ds is None:
                assert header_error is not None
                rendered = _error_render(instance, frame, None, header_error)
                lasting = header_error.lasting
            else:
                try:
                    data = dataset_frame_decode(ds, fp, frame)
                except DecodeError as exc:
                    rendered = _error_render(instance, frame, ds, exc)
                    lasting = exc.lasting
                except ValueError:
                    # The index says more frames than the file has: the file is what counts.
                    error = DecodeError("The file has fewer frames than its index says")
                    rendered = _error_render(instance, frame, ds, error)
                    lasting = True
                else:
                    rendered = RenderedFrame(
                        meta=_meta(instance, frame, ds, data, None),
                        gz=gzip.compress(data.data, compresslevel=GZIP_LEVEL, mtime=0),
                    )
                    lasting = True
            if lasting:
                lasting_frames.append(frame)
            results[frame] = rendered
        try:
            reader.verify()
        except integrity.IntegrityError as exc:
            integrity.integrity_failure(instance, "viewer", key=exc.key, reason=exc.reason)
            error = DecodeError("The stored image is damaged", lasting=False)
            return {frame: _error_render(instance, frame, ds, error) for frame in frames}, 0
    for frame in lasting_frames:
        _write(
            storage,
            frame_render_key(storage_key=instance.storage_key, frame=frame),
            _pack(results[frame]),
            replace=replace,
        )
        stored += 1
    return results, stored


def _safe_frame_meta(instance: Instance, frame: int, ds: Any) -> dict[str, Any]:
    if ds is not None:
        try:
            return frame_meta(ds, frame)
        except Exception:
            # The metadata is a convenience; a frame whose header defeats it still displays.
            log.exception("frame_meta failed for instance %s frame %s", instance.pk, frame)
    return {
        "pixel_spacing": None,
        "spacing_kind": None,
        "slice_location": None,
        "slice_thickness": None,
        "instance_number": instance.instance_number,
        "number_of_frames": instance.number_of_frames,
        "modality": instance.series.modality if instance.series_id else "",
        "series_description": instance.series.description if instance.series_id else "",
        "image_position": None,
        "image_orientation": None,
        "units": "",
        "photometric": "",
    }


def _meta(
    instance: Instance, frame: int, ds: Any, data: FrameData | None, error: str | None
) -> dict[str, Any]:
    if data is not None:
        fields = {name: value for name, value in asdict(data).items() if name != "data"}
    else:
        fields = dict.fromkeys(FRAME_FIELDS)
        fields.update(rows=instance.rows, columns=instance.columns, invert=False)
    return {**fields, **_safe_frame_meta(instance, frame, ds), "frame": frame, "error": error}


def _error_render(instance: Instance, frame: int, ds: Any, error: DecodeError) -> RenderedFrame:
    return RenderedFrame(
        meta=_meta(instance, frame, ds, None, error.reason),
        gz=gzip.compress(b"", compresslevel=GZIP_LEVEL, mtime=0),
    )


def value_itemsize(dtype: str) -> int:
    """Bytes per value of a render's dtype name ("uint8", "int16", "float32"...): numpy's names
    end in their bits, read here so that the frame endpoint counts what it sends without
    loading numpy."""
    bits = dtype.lstrip("abcdefghijklmnopqrstuvwxyz")
    if bits.isdigit() and int(bits) % 8 == 0:
        return int(bits) // 8
    import numpy as np  # a name without its bits ("bool", "longdouble"): numpy knows

    return int(np.dtype(dtype).itemsize)


def frame_values(rendered: RenderedFrame) -> np.ndarray:
    """The frame's values as an array (rows x columns, or rows x columns x 3 for RGB)."""
    import numpy as np

    meta = rendered.meta
    arr = np.frombuffer(
        gzip.decompress(rendered.gz), dtype=np.dtype(meta["dtype"]).newbyteorder("<")
    )
    shape = (
        (meta["rows"], meta["columns"], 3)
        if meta["kind"] == "rgb"
        else (meta["rows"], meta["columns"])
    )
    return arr.reshape(shape)


# --- thumbnails ---------------------------------------------------------------------------------


def _middle_image(series: Series) -> tuple[Instance | None, int]:
    # Instances without Rows (a report filed in an image series) have nothing to show.
    images = series.instances.exclude(rows=None).order_by("instance_number", "id")
    count = images.count()
    if count == 0:
        return None, 0
    instance = images[count // 2]
    return instance, max(instance.number_of_frames, 1) // 2


def _thumbnail_source(instance: Instance | None, frame: int) -> str:
    return f"{THUMBNAIL_VERSION}:{instance.pk if instance else '-'}:{frame}"


def _png_source(png: bytes) -> str | None:
    from PIL import Image  # pixel code: Pillow is loaded where images are made

    try:
        with Image.open(io.BytesIO(png)) as image:
            text = getattr(image, "text", {}) or {}
            value = text.get(THUMBNAIL_SOURCE_KEY)
            return str(value) if value is not None else None
    except Exception:
        return None


def thumbnail_get(series: Series) -> bytes:
    """A PNG of the series' middle image, at most 128 px on its long side, in the default
    window; a grey placeholder with a short reason when there is nothing to show."""
    return _thumbnail_ensure(series)[0]


def _thumbnail_ensure(series: Series) -> tuple[bytes, bool]:
    """The thumbnail, and whether it had to be made."""
    storage = _storage()
    key = series_thumbnail_key(series)
    instance, frame = _middle_image(series)
    source = _thumbnail_source(instance, frame)
    stored = _read(storage, key)
    if stored is not None and _png_source(stored) == source:
        return stored, False
    png = _thumbnail_make(instance, frame, source)
    _write(storage, key, png, replace=stored is not None)
    return png, True


def _thumbnail_make(instance: Instance | None, frame: int, source: str) -> bytes:
    if instance is None:
        image = _placeholder("No images")
    else:
        rendered = frame_render_get(instance, frame)
        if rendered.meta["error"]:
            image = _placeholder(f"Cannot display: {rendered.meta['error']}")
        else:
            image = _thumbnail_image(rendered)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(THUMBNAIL_SOURCE_KEY, source)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _thumbnail_image(rendered: RenderedFrame) -> Image.Image:
    import numpy as np
    from PIL import Image

    meta = rendered.meta
    values = frame_values(rendered)
    if meta["kind"] == "rgb":
        image = Image.fromarray(np.ascontiguousarray(values), mode="RGB")
    else:
        center = float(meta["window_center"])
        width = max(float(meta["window_width"]), 1e-6)
        low = center - width / 2
        scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / width)
        gray = np.clip(scaled, 0, 255).astype(np.uint8)
        if meta["invert"]:
            gray = 255 - gray
        image = Image.fromarray(gray, mode="L")
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    return image


def _placeholder(text: str) -> Image.Image:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), 64)
    draw = ImageDraw.Draw(image)
    font: Any
    try:
        font = ImageFont.load_default(size=11)
    except Exception:
        font = ImageFont.load_default()
    lines = textwrap.wrap(text, width=20)[:6]
    if len(textwrap.wrap(text, width=20)) > 6:
        lines[-1] = lines[-1][:17] + "..."
    y = 8
    for line in lines:
        draw.text((6, y), line, fill=230, font=font)
        y += 16
    return image


# --- a whole study ------------------------------------------------------------------------------


def _frames_missing(
    storage: Storage, instance: Instance, listings: dict[str, set[str]] | None = None
) -> list[int]:
    """The frames of the instance with no stored render.

    With a storage that lists a folder's names at any depth (`names_under`), the folder holding
    the instance's render folder is listed once and the listing kept in `listings` for the
    instances beside it (a series' images share it): one request per series on S3 rather than
    a HEAD per image. Otherwise one `exists` for a single frame, one listing for several."""
    frames = max(instance.number_of_frames, 1)
    render_dir = _render_dir(instance.storage_key)
    names_under = getattr(storage, "names_under", None)
    if names_under is not None and listings is not None:
        folder = render_dir.rsplit("/", 1)[0]
        if folder not in listings:
            listings[folder] = set(names_under(folder))
        present = listings[folder]
        return [
            frame
            for frame in range(frames)
            if frame_render_key(storage_key=instance.storage_key, frame=frame) not in present
        ]
    if frames == 1:
        key = frame_render_key(storage_key=instance.storage_key, frame=0)
        return [] if storage.exists(key) else [0]
    # One listing rather than one request per frame (S3: one LIST instead of N HEADs).
    try:
        _, names = storage.listdir(render_dir + "/")
    except FileNotFoundError:
        names = []
    found = set(names)
    return [frame for frame in range(frames) if f"{frame}.rly" not in found]


def study_render(study: Study) -> int:
    """Render every frame and series thumbnail of the study that is not stored yet; returns how
    many renders were stored. Safe to run again (and at the same time): what exists is kept."""
    if study.purged_at is not None:
        return 0
    storage = _storage()
    made = 0
    for series in study.series.select_related("study__facility").order_by("pk"):
        # Listed before this series' renders are made: what a concurrent run stores meanwhile
        # is made again here and then kept as theirs (`_write`).
        listings: dict[str, set[str]] = {}
        for instance in series.instances.select_related("series").order_by("pk").iterator():
            missing = _frames_missing(storage, instance, listings)
            if not missing:
                continue
            _, stored = _instance_render(instance, missing, storage=storage)
            made += stored
        made += _thumbnail_ensure(series)[1]
    return made
