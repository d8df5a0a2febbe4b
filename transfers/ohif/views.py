"""Serve the installed OHIF site under /ohif/, to signed-in users only.

Any path under /ohif/ that names no file and has no file extension is one of the single-page
app's routes (`/ohif/viewer`, the study list) and gets `index.html`; React Router reads the
address. The files are OHIF's code and Relay's configuration, the same for every user and free
of PHI, so hashed bundles are cached for a year and the rest revalidated (`no-cache`), marked
`relay_cacheable` so relay.headers does not turn them into no-store. The patient data comes
from /dicom-web/, which keeps its own access rules and no-store.

OHIF gets its own Content-Security-Policy, on every file (a worker takes the policy of its own
script's response): its WASM codecs need 'wasm-unsafe-eval', emscripten's embind in the codec
worker builds functions with `new Function` ('unsafe-eval'), its libraries start Blob workers,
and React sets inline styles. The portal's strict policy stays on every other page, and on the
"not installed" page here.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from csp.constants import NONE, SELF
from csp.decorators import csp
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import render
from django.views.decorators.http import require_safe

from .install import PREFIX, ohif_installed, site_dir

OHIF_CSP = {
    "default-src": [SELF],
    "script-src": [SELF, "'unsafe-eval'", "'wasm-unsafe-eval'"],
    "worker-src": [SELF, "blob:"],
    "style-src": [SELF, "'unsafe-inline'"],
    "img-src": [SELF, "data:", "blob:"],
    "connect-src": [SELF],
    "font-src": [SELF, "data:"],
    "object-src": [NONE],
    "base-uri": [SELF],
    "frame-ancestors": [NONE],
    "form-action": [SELF],
}
CONTENT_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".xml": "application/xml",
}
# webpack's content hashes: `2299.bundle.2375af8b16a1702e.js`, `0ddf166f7a343eda.wasm`.
HASHED = re.compile(r"(^|\.)[0-9a-f]{16}\.(js|wasm|woff2|css)$")
IMMUTABLE = "private, max-age=31536000, immutable"


def _file(path: str) -> Path | None:
    """The site's file for a path below /ohif/, index.html for an app route, None for nothing
    (a missing file, or a path that would leave the site)."""
    root = site_dir().resolve()
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or "\\" in path or "\x00" in path:
        return None
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):  # a link out of the site
        return None
    if candidate.is_file():
        return candidate
    if relative.suffix:  # a missing asset is a 404, not the app's HTML
        return None
    return root / "index.html"


# django-csp's per-view override (4.0: `csp`), applied to the file answers only: the sign-in
# redirect and the "not installed" page keep the portal's policy.
_ohif_policy = csp(OHIF_CSP)


def _file_response(request: HttpRequest, file: Path) -> HttpResponseBase:
    response = FileResponse(
        file.open("rb"),
        content_type=CONTENT_TYPES.get(file.suffix, "application/octet-stream"),
    )
    response["Cache-Control"] = IMMUTABLE if HASHED.search(file.name) else "no-cache"
    setattr(response, "relay_cacheable", True)  # noqa: B010 (relay.headers.CACHEABLE_ATTRIBUTE)
    return _ohif_policy(lambda _request: response)(request)


@require_safe
@login_required
def ohif(request: HttpRequest, path: str = "") -> HttpResponseBase:
    if not ohif_installed():
        return _missing(request)
    file = _file(path)
    if file is None:
        raise Http404("No such file of the OHIF viewer")
    return _file_response(request, file)


def _missing(request: HttpRequest) -> HttpResponse:
    return render(request, "transfers/ohif_missing.html", {"prefix": PREFIX}, status=404)
