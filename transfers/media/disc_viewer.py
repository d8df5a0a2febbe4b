"""The viewer that goes on every ZIP and disc: INDEX.HTM at the root and VIEWER/ beside the
DICOM files, so that a recipient with no software double-clicks INDEX.HTM and sees the images.

A page opened from a disc or an unzipped folder has a `file://` address, and Chromium (like the
other browsers) then blocks ES modules, fetch() and XHR of the files next to it, and taints a
canvas that draws an <img> of them. Only classic `<script src>` of a neighbouring file works. So
the disc viewer is classic scripts, and its pixel data arrives in script files:
`VIEWER/DATA/S0000001/F0000001.JS` calls `RelayDisc.frame(series, index, meta, "<base64>")`,
loaded one at a time near the image in view.

"The same viewer code", as far as it can go: the web viewer's pure maths (windowing.js, how
modality values become grey levels and how a drag changes the window) is what the disc viewer
uses, turned into a classic script at export time by `classic_bundle`, a small transform that
strips `import`/`export` and wraps the module in an IIFE exposing its exports on one global.
The web viewer's other modules (data.js fetches, viewport.js zooms, measures and overlays four
viewports) are tied to the server and the DOM of the portal page; the disc viewer's own script
(disc/viewer.js) is the small part a disc needs: a series list, one image, scroll and window.

Sizes are known before the first byte (the ZIP's Content-Length, the ISO's layout) without
reading any stored object: a frame file's length depends only on the image's Rows and Columns
from the index. Grey frames are stored as 16-bit codes with a linear map back to the modality
values (exact for integer values spanning at most 65536 levels, as CT and MR do; 16-bit
quantised otherwise), colour frames as 16-bit RGB 5-6-5, frames larger than `MAX_SIDE` pixels
on a side are subsampled, and each file is padded with spaces to its planned length. The values
are those the portal's viewer shows: `transfers.viewer.render.frame_render_get`, the stored
render made through `transfers.viewer.decode`, so compressed transfer syntaxes work and a study
already rendered for the web viewer is not decoded again. One frame is in memory at a time.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.template import Context, Engine

from ..models import Instance, Study
from ..viewer.decode import DecodeError
from ..viewer.render import frame_render_get, frame_render_key, frame_values, study_render

if TYPE_CHECKING:
    import numpy as np  # imported in `_encode`: the media views load no pixel code

ASSETS = Path(__file__).resolve().parent / "disc"
# The web viewer's pure modules, bundled in this order into VIEWER/WINDOW.JS.
SHARED_MODULES = ("js/viewer/windowing.js",)
SHARED_GLOBAL = "RelayWindowing"
# A frame larger than this on a side is subsampled for the disc viewer: a screen shows no more,
# and a 4000 x 3000 mammogram would otherwise take 32 MB of script.
MAX_SIDE = 1024
# Room for `RelayDisc.frame(...)` and the frame's description, before the base64 data.
FRAME_OVERHEAD = 1024
ERROR_CHARS = 200
MISMATCH = "This image is not the size its index says"
UINT16_LEVELS = 65535

INDEX_PATH = "INDEX.HTM"
VIEWER_DIR = "VIEWER"


@dataclass(frozen=True)
class ViewerImage:
    """One image of the planned media that the disc viewer shows."""

    instance: Instance
    series_key: str  # S0000001: the series' folder under VIEWER/DATA
    frame: int
    number: int  # 1-based position in its series


@dataclass(frozen=True)
class ViewerFile:
    path: str
    size: int
    data: bytes = b""
    produce: Callable[[], bytes] | None = None


# --- turning ES modules into one classic script ----------------------------------------------

_IMPORT_RE = re.compile(r"^import\b[^;]*?\bfrom\s*[\"'][^\"']+[\"']\s*;?[ \t]*$", re.M | re.S)
_BARE_IMPORT_RE = re.compile(r"^import\s*[\"'][^\"']+[\"']\s*;?[ \t]*$", re.M)
_EXPORT_DECL_RE = re.compile(
    r"^export\s+((?:async\s+)?function\*?|class|const|let|var)\s+([A-Za-z_$][\w$]*)", re.M
)
_EXPORT_LIST_RE = re.compile(r"^export\s*\{([^}]*)\}\s*;?[ \t]*$", re.M)
_LEFTOVER_RE = re.compile(r"^\s*(import|export)\b", re.M)
_NAME_RE = re.compile(r"^[A-Za-z_$][\w$]*$")


def classic_bundle(sources: list[str], *, global_name: str) -> str:
    """ES modules (given in dependency order) as one classic script that sets
    `window.<global_name>` to a frozen object of their exports.

    The modules share one function scope, so an import of a name another bundled module exports
    needs no rewriting and is simply dropped. Only what the viewer's modules use is supported:
    `export function|class|const|let|var name`, `export { a, b }` and `import { a, b } from`.
    Anything else (default exports, renames, namespace imports) raises ValueError rather than
    producing a script that fails on the disc."""
    if not _NAME_RE.match(global_name):
        raise ValueError(f"{global_name!r} is not a JavaScript name")
    exported: list[str] = []
    imported: set[str] = set()
    bodies: list[str] = []
    for source in sources:
        for match in _IMPORT_RE.finditer(source):
            clause = match.group(0)
            names = re.search(r"\{([^}]*)\}", clause)
            if names is None or re.search(r"\bas\b|\*", clause.split("from")[0]):
                raise ValueError(f"unsupported import: {clause.strip()}")
            imported.update(n.strip() for n in names.group(1).split(",") if n.strip())
        body = _IMPORT_RE.sub("", source)
        body = _BARE_IMPORT_RE.sub("", body)
        for match in _EXPORT_LIST_RE.finditer(body):
            for name in (n.strip() for n in match.group(1).split(",")):
                if not name:
                    continue
                if not _NAME_RE.match(name):
                    raise ValueError(f"unsupported export: {name}")
                exported.append(name)
        body = _EXPORT_LIST_RE.sub("", body)
        exported.extend(match.group(2) for match in _EXPORT_DECL_RE.finditer(body))
        body = _EXPORT_DECL_RE.sub(lambda m: f"{m.group(1)} {m.group(2)}", body)
        leftover = _LEFTOVER_RE.search(body)
        if leftover is not None:
            line = body[leftover.start() :].splitlines()[0].strip()
            raise ValueError(f"unsupported module syntax: {line}")
        bodies.append(body.strip("\n"))
    missing = imported - set(exported)
    if missing:
        raise ValueError(f"imports of modules not bundled: {', '.join(sorted(missing))}")
    if not exported:
        raise ValueError("the modules export nothing")
    members = ", ".join(f"{name}: {name}" for name in dict.fromkeys(exported))
    return (
        "// Made at export time from the web viewer's ES modules (transfers/media/disc_viewer.py).\n"
        "(function () {\n"
        '"use strict";\n'
        + "\n\n".join(bodies)
        + f"\n\nwindow.{global_name} = Object.freeze({{ {members} }});\n"
        "})();\n"
    )


def _static_source(relative: str) -> str:
    from django.contrib.staticfiles import finders

    found = finders.find(relative)
    path = Path(found if isinstance(found, str) else settings.BASE_DIR / "static" / relative)
    return path.read_text(encoding="utf-8")


@functools.cache
def shared_bundle() -> bytes:
    """VIEWER/WINDOW.JS: the web viewer's windowing maths as a classic script."""
    sources = [_static_source(relative) for relative in SHARED_MODULES]
    return classic_bundle(sources, global_name=SHARED_GLOBAL).encode("utf-8")


# --- frames -------------------------------------------------------------------------------------


def display_size(rows: int, columns: int) -> tuple[int, int, int]:
    """The frame's size on the disc and the step it is subsampled by."""
    step = max(1, math.ceil(max(rows, columns) / MAX_SIDE))
    return math.ceil(rows / step), math.ceil(columns / step), step


def frame_file_size(rows: int, columns: int) -> int:
    """A frame file's exact length, from the image's size alone: 2 bytes a pixel in base64."""
    shown_rows, shown_columns, _ = display_size(rows, columns)
    return FRAME_OVERHEAD + 4 * math.ceil(shown_rows * shown_columns * 2 / 3)


def frame_file_path(series_key: str, number: int) -> str:
    return f"{VIEWER_DIR}/DATA/{series_key}/F{number:07d}.JS"


def _encode(values: np.ndarray, kind: str) -> tuple[bytes, dict[str, Any]]:
    """The frame as 16-bit little-endian codes and how the viewer turns them back."""
    import numpy as np

    if kind == "rgb":
        rgb = values.astype(np.uint16)
        codes = ((rgb[..., 0] >> 3) << 11) | ((rgb[..., 1] >> 2) << 5) | (rgb[..., 2] >> 3)
        return codes.astype("<u2").tobytes(), {"encoding": "rgb565", "dtype": "uint8"}
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    if values.dtype.kind in "iu" and high - low <= UINT16_LEVELS:
        codes = (values.astype(np.int64) - int(low)).astype("<u2")
        return codes.tobytes(), {"encoding": "int", "offset": low, "scale": 1, "dtype": "int32"}
    scale = (high - low) / UINT16_LEVELS if high > low else 1.0
    clean = np.nan_to_num(values.astype(np.float64), nan=low, posinf=high, neginf=low)
    codes = np.clip(np.rint((clean - low) / scale), 0, UINT16_LEVELS).astype("<u2")
    return codes.tobytes(), {"encoding": "float", "offset": low, "scale": scale, "dtype": "float32"}


def _head(image: ViewerImage) -> bytes:
    """The start of a frame file: where the frame goes on these media (series, position)."""
    return f'RelayDisc.frame("{image.series_key}",{image.number - 1},'.encode()


def _tail(meta: dict[str, Any], payload: bytes) -> bytes:
    """The rest of a frame file: the frame's description and values, the same on any media."""
    description = json.dumps(meta, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return b"".join((description.encode(), b',"', base64.b64encode(payload), b'");\n'))


def _error_meta(image: ViewerImage, reason: str) -> dict[str, Any]:
    return {"error": reason[:ERROR_CHARS], "instance_number": image.instance.instance_number}


def frame_script(image: ViewerImage, *, before_making: Callable[[], None] | None = None) -> bytes:
    """The frame file: exactly `frame_file_size` bytes, whatever the stored image turns out to
    be (a frame that cannot be shown says why, padded to the same length).

    Taken from the frame cache when it was made before; otherwise `before_making` is called
    (the study's renders made in one pass) and the frame made from its render."""
    instance = image.instance
    size = frame_file_size(instance.rows or 0, instance.columns or 0)
    head = _head(image)
    tail = frame_tail_cached(image)
    if tail is None:
        if before_making is not None:
            before_making()
        try:
            tail = _frame_tail(image)
        except DecodeError as exc:
            tail = _tail(_error_meta(image, exc.reason), b"")
    if len(head) + len(tail) > size:
        tail = _tail(_error_meta(image, MISMATCH), b"")
    return b"".join((head, tail, b" " * (size - len(head) - len(tail))))


# --- the frame cache ------------------------------------------------------------------------------
# Making a frame file (reading the stored render, gunzip, base64) costs more than copying the
# image itself, on every download. So the part of it that does not depend on the media (the
# description and the base64 values: everything after `RelayDisc.frame("S...",n,`) is kept in
# storage next to the frame's render when first made, and a later download only reads it.
# It is keyed like the render, by the stored copy's key (a rewritten copy has a new key) and
# FRAME_CACHE_VERSION (a change to the encoding or MAX_SIDE misses) and the size in the
# index (a corrected Rows or Columns misses); the purge deletes it with
# the study's renders. Frames that cannot be shown are not kept (they are cheap to say again).

FRAME_CACHE_VERSION = 1
_TAIL_END = b'");\n'


def frame_cache_key(instance: Instance, frame: int) -> str:
    """Where the frame's tail is kept: next to its render, named with the size the index says
    (a tail made for another size is not this image's any more)."""
    render_key = frame_render_key(storage_key=instance.storage_key, frame=frame)
    size = f"{instance.rows or 0}x{instance.columns or 0}"
    return f"{render_key.removesuffix('.rly')}.disc{FRAME_CACHE_VERSION}-{size}.js"


def frame_tail_cached(image: ViewerImage) -> bytes | None:
    """The kept description and values of the image's frame, or None (not kept, unreadable)."""
    storage = storages["default"]
    key = frame_cache_key(image.instance, image.frame)
    try:
        with storage.open(key, "rb") as fh:
            tail = bytes(fh.read())
    except (FileNotFoundError, OSError):
        return None
    # A write cut short or another format: made again. The base64 values are as long as the
    # frame's displayed size says.
    shown_rows, shown_columns, _ = display_size(
        image.instance.rows or 0, image.instance.columns or 0
    )
    values = 4 * math.ceil(shown_rows * shown_columns * 2 / 3)
    end = len(tail) - len(_TAIL_END)
    if (
        not tail.startswith(b"{")
        or not tail.endswith(_TAIL_END)
        or end - values < 3
        or tail[end - values - 2 : end - values] != b',"'
    ):
        return None
    return tail


def _frame_tail_keep(image: ViewerImage, tail: bytes) -> None:
    storage = storages["default"]
    key = frame_cache_key(image.instance, image.frame)
    try:
        path = storage.path(key)
    except NotImplementedError:
        pass  # a bucket: saved as any object
    else:
        # In a folder, written to a temporary name and renamed, without the fsync that the
        # storage does for images (a first download would wait for hundreds of them): a frame
        # lost or cut short by a crash is simply made again (`frame_tail_cached` checks it).
        with contextlib.suppress(OSError):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(tail)
                mode = getattr(storage, "file_permissions_mode", None)
                if mode is not None:
                    os.chmod(partial, mode)
                os.replace(partial, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
        return
    try:
        name = storage.save(key, ContentFile(tail))
    except OSError:
        return  # a cache: made again next time
    if name != key:
        # Another download kept the same frame first (a file system storage then picks a new
        # name rather than overwrite): theirs stays.
        storage.delete(name)


def _frame_tail(image: ViewerImage) -> bytes:
    """The frame's description and values, made from its render (and kept, when shown)."""
    instance = image.instance
    rendered = frame_render_get(instance, image.frame)
    meta = rendered.meta
    if meta.get("error"):
        return _tail(_error_meta(image, str(meta["error"])), b"")
    values = frame_values(rendered)
    shown_rows, shown_columns, step = display_size(instance.rows or 0, instance.columns or 0)
    if step > 1:
        values = values[::step, ::step]
    if values.shape[:2] != (shown_rows, shown_columns):
        return _tail(_error_meta(image, MISMATCH), b"")
    payload, encoding = _encode(values, str(meta["kind"]))

    def number(value: Any) -> float | None:
        try:
            result = float(value)
        except (TypeError, ValueError):
            return None
        return result if math.isfinite(result) else None

    description = {
        "rows": int(values.shape[0]),
        "columns": int(values.shape[1]),
        "kind": meta["kind"],
        **encoding,
        "min_value": number(meta.get("min_value")) or 0.0,
        "max_value": number(meta.get("max_value")) or 0.0,
        "window_center": number(meta.get("window_center")) or 0.0,
        "window_width": number(meta.get("window_width")) or 1.0,
        "invert": bool(meta.get("invert")),
        "instance_number": meta.get("instance_number"),
        "frame": image.frame,
        "frames": max(instance.number_of_frames, 1),
        "slice_location": number(meta.get("slice_location")),
        "units": str(meta.get("units") or ""),
        "error": None,
    }
    tail = _tail(description, payload)
    if len(_head(image)) + len(tail) <= frame_file_size(instance.rows or 0, instance.columns or 0):
        _frame_tail_keep(image, tail)
    return tail


def _study_rendered(study: Study) -> Callable[[], None]:
    """Renders every frame of the study the web viewer has not rendered yet, once, when the
    first frame of the study not in the frame cache is made: a multi-frame image is then decoded in one pass
    rather than once per frame. Usually there is nothing to do (the study was rendered when it
    arrived)."""
    done: list[bool] = []

    def ensure() -> None:
        if not done:
            done.append(True)
            study_render(study)

    return ensure


def _frame_rendered(rendered: Callable[[], None], image: ViewerImage) -> bytes:
    return frame_script(image, before_making=rendered)


# --- the pages ----------------------------------------------------------------------------------


@functools.cache
def _engine() -> Engine:
    return Engine(dirs=[str(ASSETS)], autoescape=True)


def _asset(name: str) -> bytes:
    return (ASSETS / name).read_bytes()


def _person(name: str) -> str:
    parts = [p.strip() for p in name.split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(p for p in parts[2:] if p)
    shown = ", ".join(p for p in (family, " ".join(x for x in (given, rest) if x)) if p)
    return shown or "(no name)"


def _series_label(instance: Instance) -> str:
    series = instance.series
    number = f"Series {series.series_number}" if series.series_number is not None else "Series"
    parts = [number, series.modality, series.description]
    return " \u00b7 ".join(p for p in parts if p)


def viewer_files(
    studies: list[tuple[Study, list[Instance]]], reports: list[tuple[Study, list[str]]]
) -> tuple[list[ViewerFile], list[ViewerFile]]:
    """INDEX.HTM with the viewer's scripts, and the frame files (in the order of the media).

    `studies` are each study with its planned instances in media order; `reports` the paths of
    the reports that go on the media with each study. Nothing is read from storage here."""
    index_studies: list[dict[str, Any]] = []
    data_studies: list[dict[str, Any]] = []
    frames: list[ViewerFile] = []
    series_count = 0
    report_paths = dict((study.pk, paths) for study, paths in reports)
    for study, instances in studies:
        rendered = _study_rendered(study)
        series_list: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        current_series = None
        for instance in instances:
            if not instance.rows or not instance.columns:
                continue  # a report or a document: nothing the viewer can draw
            if instance.series_id != current_series:
                series_count += 1
                current_series = instance.series_id
                current = {
                    "key": f"S{series_count:07d}",
                    "number": series_count,
                    "label": _series_label(instance),
                    "count": 0,
                }
                series_list.append(current)
            assert current is not None
            for frame in range(max(instance.number_of_frames, 1)):
                current["count"] += 1
                image = ViewerImage(
                    instance=instance,
                    series_key=current["key"],
                    frame=frame,
                    number=current["count"],
                )
                frames.append(
                    ViewerFile(
                        path=frame_file_path(image.series_key, image.number),
                        size=frame_file_size(instance.rows, instance.columns),
                        produce=functools.partial(_frame_rendered, rendered, image),
                    )
                )
        when = f"{study.study_date:%Y-%m-%d}" if study.study_date else ""
        entry = {
            "patient": _person(study.patient_name),
            "date": when,
            "description": study.description,
            "modalities": "/".join(study.modality_list),
            "facility": study.facility.name,
            "series": series_list,
        }
        index_studies.append({**entry, "reports": report_paths.get(study.pk, [])})
        data_studies.append(entry)
    patients = list(dict.fromkeys(s["patient"] for s in index_studies))
    index = (
        _engine()
        .get_template("index.htm")
        .render(
            Context(
                {
                    "patients": patients,
                    "studies": index_studies,
                    "has_images": bool(frames),
                }
            )
        )
    )
    study_js = (
        "RelayDisc.study("
        + json.dumps({"studies": data_studies}, ensure_ascii=True).replace("</", "<\\/")
        + ");\n"
    )
    pages = [
        ViewerFile(path=INDEX_PATH, size=0, data=index.encode("utf-8")),
        ViewerFile(path=f"{VIEWER_DIR}/VIEWER.HTM", size=0, data=_asset("viewer.htm")),
        ViewerFile(path=f"{VIEWER_DIR}/VIEWER.CSS", size=0, data=_asset("viewer.css")),
        ViewerFile(path=f"{VIEWER_DIR}/WINDOW.JS", size=0, data=shared_bundle()),
        ViewerFile(path=f"{VIEWER_DIR}/VIEWER.JS", size=0, data=_asset("viewer.js")),
        ViewerFile(path=f"{VIEWER_DIR}/STUDY.JS", size=0, data=study_js.encode("utf-8")),
    ]
    return [ViewerFile(f.path, len(f.data), f.data) for f in pages], frames
