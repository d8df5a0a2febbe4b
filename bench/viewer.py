"""Rendering and viewing the 300-slice CT (issue 4, "Performance"): how long until every frame is
rendered after the ingest, how long the server takes for one frame's viewer data and for a
thumbnail next to Orthanc's image endpoints, and the time to the first image in headless Chromium.

The sections use the Workbench of dicom.py: the study Relay received through its gateway, and an
Orthanc that received the same files from storescu.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
from dicom import Workbench
from measure import MiB, Row, Section, UploadFailed, percentile
from servers import REPO

SAMPLES = 50  # frames (instances) timed per endpoint
BROWSER_LOADS = 4  # page loads in Chromium: the first, then warm ones
CHROMIUM = Path("/usr/bin/chromium")

VIEWER_FILES = (
    REPO / "templates" / "transfers" / "viewer.html",
    REPO / "static" / "js" / "viewer" / "main.js",
)


def _sample(items: list[Any], count: int = SAMPLES) -> list[Any]:
    """`count` items spread evenly over the list (every 6th of 300 slices)."""
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def _ms(values: list[float], fraction: float) -> float:
    return percentile(values, fraction) * 1000


# --- 5. rendering -------------------------------------------------------------------------------


def render_section(wb: Workbench) -> Section:
    relay, study = wb.need()
    assert wb.ingest is not None
    section = Section(
        key="render",
        title="5. rendering every frame after the ingest (in-process study_render)",
        relay_label="render",
        peer_label="ingest",
    )
    started = time.perf_counter()
    proc = relay.task_start("render", study_uuid=study["uuid"])
    result = relay.task_result(proc, "render")
    process_s = time.perf_counter() - started
    if result["missing"]:
        raise UploadFailed(f"{result['missing']} of {result['frames']} frames have no render")
    section.rows = [
        Row(
            "every frame rendered: study_render (s)",
            result["wall_s"],
            wb.ingest.wall_s,
            aim="<= 1.00x",
        ),
        Row(
            "render process, start to finish (s)",
            process_s,
            wb.ingest.wall_s,
            aim="<= 1.00x",
        ),
        Row("frames rendered", float(result["frames"]), None, "{:.0f}"),
        Row("per frame (ms)", result["wall_s"] / max(result["frames"], 1) * 1000, None, "{:.1f}"),
        Row(
            "render process RSS after django.setup() (MiB)",
            result["rss_after_setup"] / MiB,
            None,
            "{:.0f}",
        ),
        Row("render process peak RSS (MiB)", result["rss_peak"] / MiB, None, "{:.0f}"),
    ]
    section.notes.append(
        "in-process: transfers.viewer.render.study_render in one Python process in Relay's environment "
        "(the body of study_render_task; not through Celery and its broker), started as soon as "
        f"the ingest ({wb.ingest_how}) finished. In production the task is queued when the study "
        "is complete, after RELAY_STUDY_QUIET_SECONDS (300 s) for a gateway study."
    )
    section.raw = {**result, "process_s": process_s, "ingest_s": wb.ingest.wall_s}
    return section


# --- 6. per-frame viewer data and thumbnails ----------------------------------------------------


def viewer_endpoints_exist() -> bool:
    urls = REPO / "transfers" / "viewer" / "urls.py"
    return urls.exists() and "frames" in urls.read_text()


def _get_raw(client: httpx.Client, url: str) -> int:
    """GET, body read as it came (a gzip Content-Encoding is not inflated: that would be the
    client's work, which the browser does natively); the body's size."""
    with client.stream("GET", url) as answer:
        size = sum(len(chunk) for chunk in answer.iter_raw())
        if answer.status_code != 200:
            raise UploadFailed(f"GET {url}: HTTP {answer.status_code}")
    return size


def _timed_gets(client: httpx.Client, urls: list[str]) -> tuple[list[float], int]:
    """One warm-up pass over the URLs, then one timed pass; (seconds per request, last size)."""
    for url in urls:
        _get_raw(client, url)
    times: list[float] = []
    size = 0
    for url in urls:
        started = time.perf_counter()
        size = _get_raw(client, url)
        times.append(time.perf_counter() - started)
    return times, size


def viewer_section(wb: Workbench) -> Section:
    relay, study = wb.need()
    orthanc, _ = wb.reference_orthanc()
    picked = _sample(study["instances"])
    uids = [item["sop_instance_uid"] for item in picked]
    series_uids = sorted({item["series_instance_uid"] for item in study["instances"]})
    thumb_uids = [series_uids[i % len(series_uids)] for i in range(len(uids))]
    section = Section(key="viewer", title="", peer_label="Orthanc")

    http: dict[str, Any] = {}
    if viewer_endpoints_exist():
        base = f"/studies/{study['uuid']}/view"
        try:
            with relay.signed_in(timeout_s=60) as client:
                http["frame_s"], http["frame_bytes"] = _timed_gets(
                    client, [f"{base}/frames/{uid}/0/" for uid in uids]
                )
                http["thumb_s"], http["thumb_bytes"] = _timed_gets(
                    client, [f"{base}/thumbs/{uid}/" for uid in thumb_uids]
                )
        except Exception as exc:
            http = {}
            section.notes.append(f"over HTTP failed ({exc}); Relay measured in-process only")
    # Server work without HTTP, in a process of its own: the breakdown of the HTTP numbers, or
    # the only Relay numbers while the endpoints do not exist.
    inproc = relay.task(
        "viewer",
        study_uuid=study["uuid"],
        sop_instance_uids=uids,
        series_instance_uids=series_uids,
    )
    mode = "HTTP" if http else "in-process"
    if not http:
        http = {
            "frame_s": inproc["frame_s"],
            "frame_bytes": inproc["frame_gz_bytes"],
            "thumb_s": inproc["thumbnail_s"],
            "thumb_bytes": inproc["thumbnail_bytes"],
        }

    listing = httpx.get(f"{orthanc.base_url}/instances?expand", timeout=60).json()
    ids = {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in listing}
    with httpx.Client(base_url=orthanc.base_url, timeout=60) as client:
        peer_frames, peer_frame_bytes = _timed_gets(
            client, [f"/instances/{ids[uid]}/frames/0/image-uint16" for uid in uids]
        )
        peer_thumbs, peer_thumb_bytes = _timed_gets(
            client, [f"/instances/{ids[uid]}/preview" for uid in uids]
        )
    # The cost of HTTP itself on each side: a small authenticated API answer from gunicorn
    # (token lookup, one query) and Orthanc's /system.
    with httpx.Client(base_url=relay.base_url, headers=relay.auth_headers, timeout=60) as client:
        relay_floor, _ = _timed_gets(client, ["/api/v1/facilities"] * len(uids))
    with httpx.Client(base_url=orthanc.base_url, timeout=60) as client:
        peer_floor, _ = _timed_gets(client, ["/system"] * len(uids))

    section.title = f"6. viewer data, {len(uids)} frames: Relay {mode} vs Orthanc HTTP (ms)"
    section.relay_label = f"Relay ({mode})"
    frames, thumbs = http["frame_s"], http["thumb_s"]
    section.rows = [
        Row(
            "one frame, median (ms)", _ms(frames, 0.5), _ms(peer_frames, 0.5), "{:.1f}", "<= 1.00x"
        ),
        Row("one frame, p95 (ms)", _ms(frames, 0.95), _ms(peer_frames, 0.95), "{:.1f}", "<= 1.00x"),
        Row("thumbnail, median (ms)", _ms(thumbs, 0.5), _ms(peer_thumbs, 0.5), "{:.1f}"),
        Row("thumbnail, p95 (ms)", _ms(thumbs, 0.95), _ms(peer_thumbs, 0.95), "{:.1f}"),
    ]
    if mode == "HTTP":
        section.rows += [
            Row(
                "of which server work: frame, median (ms)",
                _ms(inproc["frame_s"], 0.5),
                None,
                "{:.1f}",
            ),
            Row(
                "of which server work: thumbnail, median (ms)",
                _ms(inproc["thumbnail_s"], 0.5),
                None,
                "{:.1f}",
            ),
        ]
    section.rows += [
        Row(
            "HTTP floor: small GET, median (ms)",
            _ms(relay_floor, 0.5),
            _ms(peer_floor, 0.5),
            "{:.1f}",
            "<= 2.00x",
        ),
        Row("frame payload (KiB)", http["frame_bytes"] / 1024, peer_frame_bytes / 1024, "{:.0f}"),
        Row(
            "thumbnail payload (KiB)", http["thumb_bytes"] / 1024, peer_thumb_bytes / 1024, "{:.1f}"
        ),
    ]
    if mode == "HTTP":
        section.notes.append(
            "Relay over HTTP on gunicorn, signed in: GET .../view/frames/<sop>/0/ and "
            ".../view/thumbs/<series>/ (body read raw, not inflated); 'server work' = the same "
            "lookups + frame_render_get / thumbnail_get in a process of their own, no HTTP."
        )
    else:
        section.notes.append(
            "Relay in-process: the viewer's HTTP endpoints (transfers/viewer/urls.py) do not "
            "exist yet, so Relay's numbers are server work without HTTP (instance lookup + "
            "frame_render_get; series lookup + thumbnail_get), while Orthanc's are HTTP round "
            "trips on loopback: the ratio flatters Relay by about the HTTP floor row."
        )
    section.notes.append(
        "HTTP floor: Relay GET /api/v1/facilities with a token on gunicorn, Orthanc GET /system. "
        "Relay frame = gzip of the modality-LUT values; Orthanc frame = /frames/0/image-uint16 "
        "(PNG). Relay's thumbnail is one per series (the same one each time); Orthanc's preview "
        "is rendered per instance. One warm-up pass, then one timed request per frame."
    )
    section.raw = {
        "mode": mode,
        "relay_frame_s": frames,
        "relay_thumbnail_s": thumbs,
        "relay_inprocess": inproc,
        "orthanc_frame_s": peer_frames,
        "orthanc_preview_s": peer_thumbs,
        "relay_http_floor_s": relay_floor,
        "orthanc_http_floor_s": peer_floor,
    }
    return section


# --- 7. time to first image in Chromium ---------------------------------------------------------

# Polled in the page on every animation frame: the time since navigation start (ms) once a canvas
# holds pixels that are not all the same, else false. Each canvas is copied into a scratch canvas
# rather than asked for a context of its own, so a viewer's WebGL or 2D canvas is left alone. The
# copy is a nearest-neighbour sample of at most 160 x 160 of the canvas's pixels into one scratch
# canvas kept for the page: reading back a whole 1130 x 685 canvas took ~11 ms on every animation
# frame, two thirds of the page's main thread, which slowed the very thing it timed.
FIRST_IMAGE_JS = """
() => {
  const side = 160;
  const scratch = window.__firstImageScratch || (window.__firstImageScratch = document.createElement('canvas'));
  const ctx = scratch.getContext('2d', {willReadFrequently: true});
  for (const c of document.querySelectorAll('canvas')) {
    if (!c.width || !c.height || c === scratch) continue;
    const w = Math.min(c.width, side), h = Math.min(c.height, side);
    if (scratch.width !== w || scratch.height !== h) { scratch.width = w; scratch.height = h; }
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, w, h);
    ctx.drawImage(c, 0, 0, c.width, c.height, 0, 0, w, h);
    const d = ctx.getImageData(0, 0, w, h).data;
    for (let i = 4; i < d.length; i += 4) {
      if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2] || d[i + 3] !== d[3]) {
        return performance.now();
      }
    }
  }
  return false;
}
"""


def viewer_page_missing() -> str:
    missing = [str(path.relative_to(REPO)) for path in VIEWER_FILES if not path.exists()]
    urls = REPO / "transfers" / "viewer" / "urls.py"
    if not urls.exists() or "view" not in urls.read_text().split("urlpatterns", 1)[-1]:
        missing.append("a /view/ route in transfers/viewer_urls.py")
    return ", ".join(missing)


# After the first image: where the time went, from the page's own timings (ms since navigation
# start). Navigation Timing for the HTML, Resource Timing for the viewer's modules and the first
# frame (the earliest request of a frame URL), and the marks main.js sets when it runs, when the
# first frame's bytes are in memory as values and when it is drawn ("relay-viewer:*", absent on
# a viewer that sets none). `frame_requests` counts the requests of that frame's URL: one when
# the page's preload was taken by the viewer's fetch, two when it was fetched again.
BREAKDOWN_JS = """
() => {
  const nav = performance.getEntriesByType('navigation')[0] || {};
  const res = performance.getEntriesByType('resource');
  const scripts = res.filter((r) => /\\/js\\/viewer\\/[^/]+\\.js/.test(r.name));
  const frames = res.filter((r) => /\\/frames\\//.test(r.name)).sort((a, b) => a.startTime - b.startTime);
  const frame = frames[0] || null;
  const main = scripts.find((r) => /\\/main(\\.[0-9a-f]+)?\\.js/.test(r.name)) || null;
  const marks = {};
  for (const m of performance.getEntriesByType('mark')) {
    if (m.name.startsWith('relay-viewer:') && !(m.name.slice(13) in marks)) marks[m.name.slice(13)] = m.startTime;
  }
  return {
    html_first_byte: nav.responseStart ?? null,
    html_done: nav.responseEnd ?? null,
    dom_interactive: nav.domInteractive ?? null,
    main_js_start: main ? main.startTime : null,
    main_js_done: main ? main.responseEnd : null,
    scripts_done: scripts.length ? Math.max(...scripts.map((r) => r.responseEnd)) : null,
    script_files: scripts.length,
    viewer_start: marks.start ?? null,
    frame_start: frame ? frame.startTime : null,
    frame_first_byte: frame ? frame.responseStart : null,
    frame_done: frame ? frame.responseEnd : null,
    frame_requests: frame ? frames.filter((r) => r.name === frame.name).length : 0,
    frame_decoded: marks.decoded ?? null,
    drawn: marks.drawn ?? null,
  };
}
"""

# The breakdown's steps as printed, in the order the page goes through them.
BREAKDOWN_STEPS = (
    ("html_first_byte", "HTML 1st byte"),
    ("html_done", "HTML"),
    ("scripts_done", "modules"),
    ("viewer_start", "main.js runs"),
    ("frame_start", "frame asked"),
    ("frame_done", "frame in"),
    ("frame_decoded", "values"),
    ("drawn", "drawn"),
    ("first_image", "seen"),
)
# Chromium's own counters of the page's main thread (CDP Performance.getMetrics), in seconds.
MAIN_THREAD_METRICS = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration")


def breakdown_line(load: dict[str, Any]) -> str:
    """One load's steps as `name ms` in page order, then the main thread's work."""
    steps = [
        f"{label} {load[key]:.0f}" for key, label in BREAKDOWN_STEPS if load.get(key) is not None
    ]
    busy = load.get("main_thread") or {}
    work = ", ".join(
        f"{name.removesuffix('Duration').lower()} {busy[name] * 1000:.0f}"
        for name in MAIN_THREAD_METRICS
        if name in busy
    )
    frame = f"; frame requests {load.get('frame_requests', 0)}"
    return " > ".join(steps) + frame + (f"; main thread ms: {work}" if work else "")


def browser_section(wb: Workbench) -> Section:
    section = Section(
        key="browser",
        title="7. time to first image in headless Chromium",
        relay_label="Relay",
        peer_label="-",
    )
    missing = viewer_page_missing()
    if missing:
        section.error = f"not measured: viewer page missing ({missing})"
        return section
    if not CHROMIUM.exists():
        section.error = f"not measured: {CHROMIUM} is missing (Debian's chromium package)"
        return section
    relay, study = wb.need()
    with relay.signed_in(timeout_s=60) as client:
        cookies = dict(client.cookies.items())
    url = f"{relay.base_url}/studies/{study['uuid']}/view/"
    cold: list[dict[str, Any]] = []
    if not _first_frames_rendered(study):
        # `--only browser`: the render task (section 5, or the worker once the study is complete)
        # has not run. One load as a viewer opening the study that early sees it, then the
        # renders, so that the rows below measure what `make bench` measures.
        cold = first_image_loads(url, relay.base_url, cookies, loads=1)
        relay.task("render", study_uuid=study["uuid"])
    loads = first_image_loads(url, relay.base_url, cookies)
    times = [load["first_image"] for load in loads]
    warm = times[1:] or times
    section.rows = [
        Row("first image, first load (ms)", times[0], None, "{:.0f}", "<= 300 ms"),
        Row(
            f"first image, median of {len(warm)} more loads (ms)",
            percentile(warm, 0.5),
            None,
            "{:.0f}",
            "<= 300 ms",
        ),
    ]
    if cold:
        section.rows.append(
            Row(
                "first image, first frame not yet rendered (ms)",
                cold[0]["first_image"],
                None,
                "{:.0f}",
            )
        )
    section.notes.append(
        "Playwright with Debian's /usr/bin/chromium (headless): performance.now() in the page "
        "(ms since navigation start) when a canvas first holds non-blank pixels; one new page "
        "per load in one browser context (later loads have the browser cache); each next "
        "load once the previous page's network is idle."
    )
    section.notes.append(
        "breakdown, ms since navigation start (Navigation and Resource Timing, the viewer's "
        "relay-viewer:* marks; main thread: CDP Performance.getMetrics up to the first image):"
    )
    named = [("first load", loads[0])] + [
        (f"load {i + 2}", load) for i, load in enumerate(loads[1:])
    ]
    if cold:
        named.insert(0, ("not yet rendered", cold[0]))
    section.notes += [f"  {name}: {breakdown_line(load)}" for name, load in named]
    section.raw = {"loads_ms": times, "loads": loads, "not_yet_rendered": cold}
    return section


def _first_frames_rendered(study: dict[str, Any]) -> bool:
    """Whether the study's renders are stored (transfers.viewer.render's layout): the first
    image's frame 0 is what the viewer asks for first."""
    keys = sorted(item["storage_key"] for item in study["instances"])
    if not keys:
        return False
    name = keys[0].removeprefix("dicom/").removesuffix(".dcm")
    return (Path(study["media_root"]) / "renders" / name / "0.rly").exists()


def first_image_ms(url: str, base_url: str, cookies: dict[str, str]) -> list[float]:
    """Time to first image of BROWSER_LOADS loads in one browser context (ms)."""
    return [load["first_image"] for load in first_image_loads(url, base_url, cookies)]


def first_image_loads(
    url: str, base_url: str, cookies: dict[str, str], loads: int = BROWSER_LOADS
) -> list[dict[str, Any]]:
    """`loads` page loads in one new browser context: for each, the time to first image
    (FIRST_IMAGE_JS) and the page's breakdown (BREAKDOWN_JS, CDP Performance.getMetrics)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    results: list[dict[str, Any]] = []
    with sync_playwright() as pw:
        # executable_path: the system's Chromium; Playwright never downloads a browser here.
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.add_cookies(
                [{"name": name, "value": value, "url": base_url} for name, value in cookies.items()]
            )
            for _ in range(loads):
                page = context.new_page()
                try:
                    cdp = context.new_cdp_session(page)
                    cdp.send("Performance.enable")
                    answer = page.goto(url, wait_until="commit")
                    if answer is None or answer.status != 200:
                        raise UploadFailed(
                            f"GET {url} in Chromium: HTTP {answer.status if answer else '?'}"
                        )
                    handle = page.wait_for_function(FIRST_IMAGE_JS, polling="raf", timeout=30_000)
                    first = float(handle.json_value())
                    metrics = cdp.send("Performance.getMetrics")["metrics"]
                    load = dict(page.evaluate(BREAKDOWN_JS))
                    load["first_image"] = first
                    load["main_thread"] = {
                        m["name"]: m["value"] for m in metrics if m["name"] in MAIN_THREAD_METRICS
                    }
                    results.append(load)
                    # The page goes on loading the study's other frames and thumbnails after its
                    # first image; the next load starts once they are in (or after 30 s), as a
                    # person opening the study again would find the server, not behind a queue
                    # of the previous page's requests (measured: up to 440 ms of waiting for
                    # the HTML when it did not wait).
                    with contextlib.suppress(PlaywrightTimeout):
                        page.wait_for_load_state("networkidle", timeout=30_000)
                finally:
                    page.close()
        finally:
            browser.close()
    return results
