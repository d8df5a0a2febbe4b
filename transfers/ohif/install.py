"""Install the prebuilt OHIF viewer (`@ohif/app`) so that Relay can serve it under /ohif/.

The npm package ships a built `dist/`, so no JavaScript is built here: `npm pack` fetches the one
pinned tarball (never `npm install`, which wants node >= 24 and pulls the package's whole
dependency tree), its SHA-512 is checked against the integrity pinned below, and `package/dist`
is extracted without what a radiology exchange does not use:

- `ort/` (136 MB): onnxruntime-web, the runtime of OHIF's AI segmentation;
- `dicom-microscopy-viewer/` (20 MB): whole-slide microscopy;
- source maps, the service worker and the files of other hosts (`_headers`, `serve.json`, ...).

The build assumes it is served at a site root, so the root paths are rewritten for the prefix
(the webpack public path of 8 bundles, the HTML's links, the CSS fonts, the manifest's icons),
and the two inline scripts move into `relay-boot.js` so the page needs no 'unsafe-inline'. Each
rewrite must find its string the expected number of times, or the install stops: a new OHIF
version that moved a path fails here instead of half-working in the browser. Relay's own
`app-config.js` replaces OHIF's: one same-origin DICOMweb data source, `/dicom-web`, which
answers with the signed-in user's access rules through the session cookie.

The site is built beside the installed one and swapped in, with `relay-ohif.json` (version and
integrity) written last: a site without it is not installed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from django.conf import settings

# The pinned release and the integrity the npm registry publishes for its tarball
# (`npm view @ohif/app@3.13.2 dist.integrity`). Changing the version means changing both, then
# running the install: the rewrite checks tell whether the new build still fits.
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
PREFIX = "/ohif/"
MARKER = "relay-ohif.json"

# Left out of the extracted dist: top-level folders, and file names anywhere.
LEFT_OUT_DIRS = {"ort", "dicom-microscopy-viewer"}
LEFT_OUT_FILES = {
    "sw.js",
    "init-service-worker.js",
    "_headers",
    "_redirects",
    "serve.json",
    "google.js",
    "app-config.js",  # Relay writes its own
}

WEBPACK_PUBLIC_PATH = '__webpack_require__.p = "/";'
MICROSCOPY_IMPORT = "browserImportFunction('/dicom-microscopy-viewer/"
INLINE_TIMER = '<script>console.time("scriptToView"),window.PUBLIC_URL="/"</script>'
INLINE_IMPORT = (
    '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
)
SERVICE_WORKER_TAG = (
    '<script rel="preload" as="script" type="module" src="/init-service-worker.js"></script>'
)
ROOT_ATTRIBUTE = re.compile(r'(href|src|content)="/(?!/)')
BOOT_JS = f'window.PUBLIC_URL="{PREFIX}";function browserImportFunction(n){{return import(n)}}\n'


@dataclass(frozen=True)
class Expected:
    """How many times the build of the pinned version holds each string the rewrite changes."""

    public_path_files: int = (
        8  # app, 136, 2299, 8097 (codecs), compute, histogram, interp., polySeg
    )
    microscopy_imports: int = 1
    css_root_urls: int = 5  # the woff2 font
    manifest_icons: int = 9
    html_root_attributes: int = 32  # links, icons, app-config.js, the app bundle and its CSS


EXPECTED = Expected()

APP_CONFIG = """\
/* Relay's OHIF configuration, written by `manage.py ohif_install`. One data source: Relay's own
   DICOMweb on this origin. The session cookie goes with every request, so there is no token here,
   and /dicom-web/ answers with the signed-in user's access rules (404 or [] for anything else). */
window.config = {
  routerBasename: '/ohif',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'relay',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'relay',
      configuration: {
        friendlyName: 'Relay',
        name: 'relay',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/dicom-web',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        supportsReject: false,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
        acceptHeader: ['multipart/related; type=application/octet-stream; transfer-syntax=*'],
      },
    },
  ],
};
"""


class OhifInstallError(Exception):
    """The package could not be fetched, did not match its pinned integrity, or its build does
    not look like the one the rewrite was written for."""


def ohif_dir() -> Path:
    """Where the tarball and the installed site live (settings.RELAY_OHIF_DIR, under var/)."""
    return Path(settings.RELAY_OHIF_DIR)


def site_dir(base: Path | None = None) -> Path:
    return (base or ohif_dir()) / "site"


def installed_version(base: Path | None = None) -> str | None:
    """The OHIF version whose site is in place, or None when there is none (or a broken one)."""
    try:
        marker = json.loads((site_dir(base) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    version = marker.get("version") if isinstance(marker, dict) else None
    return version if isinstance(version, str) else None


def ohif_installed(base: Path | None = None) -> bool:
    return installed_version(base) is not None


def sri_sha512(path: Path) -> str:
    """The file's digest written as npm's `dist.integrity` (Subresource Integrity) is."""
    digest = hashlib.sha512()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def tarball_fetch(*, dest: Path, npm: str = "npm") -> Path:
    """`npm pack` the pinned version into dest: the registry's tarball, nothing installed."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(dest)]
    try:
        done = subprocess.run(  # noqa: S603 (a fixed command line; npm from PATH)
            command, capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise OhifInstallError(f"{' '.join(command)}: {error}") from error
    if done.returncode != 0:
        raise OhifInstallError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
    tarball = dest / f"ohif-app-{OHIF_VERSION}.tgz"
    if not tarball.is_file():
        raise OhifInstallError(f"npm pack did not write {tarball}")
    return tarball


def tarball_verify(tarball: Path, integrity: str | None = None) -> None:
    integrity = integrity or OHIF_INTEGRITY
    found = sri_sha512(tarball)
    if found != integrity:
        raise OhifInstallError(
            f"{tarball.name} is not the pinned @ohif/app {OHIF_VERSION}: "
            f"integrity {found}, expected {integrity}"
        )


def _kept(relative: PurePosixPath) -> bool:
    if relative.parts and relative.parts[0] in LEFT_OUT_DIRS:
        return False
    return relative.name not in LEFT_OUT_FILES and not relative.name.endswith(".map")


def dist_extract(tarball: Path, *, dest: Path) -> Path:
    """Extract `package/dist` of the tarball into dest, without what is left out; returns dest."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as archive:
        members = []
        for member in archive.getmembers():
            path = PurePosixPath(member.name)
            if path.parts[:2] != ("package", "dist") or len(path.parts) < 3:
                continue
            relative = PurePosixPath(*path.parts[2:])
            if not _kept(relative) or not (member.isfile() or member.isdir()):
                continue
            member.name = str(relative)
            members.append(member)
        # The "data" filter refuses absolute paths, `..` and links out of dest.
        try:
            archive.extractall(dest, members=members, filter="data")
        except tarfile.FilterError as error:
            raise OhifInstallError(f"{tarball.name}: {error}") from error
    if not (dest / "index.html").is_file():
        raise OhifInstallError(f"{tarball.name} has no package/dist/index.html")
    return dest


def _replace(text: str, old: str, new: str, *, count: int, where: str) -> str:
    found = text.count(old)
    if found != count:
        raise OhifInstallError(
            f"{where}: expected {old!r} {count} time(s), found {found}: "
            "not the build this install was written for"
        )
    return text.replace(old, new)


def site_rewrite(site: Path, *, prefix: str = PREFIX, expected: Expected = EXPECTED) -> None:
    """Rewrite the build's root paths in place for `prefix`; raises OhifInstallError on any
    string not found the expected number of times."""
    assert prefix.startswith("/") and prefix.endswith("/")
    rewritten = 0
    for js in sorted(site.glob("*.js")):
        text = js.read_text(encoding="utf-8")
        if WEBPACK_PUBLIC_PATH not in text:
            continue
        text = _replace(
            text,
            WEBPACK_PUBLIC_PATH,
            f'__webpack_require__.p = "{prefix}";',
            count=1,
            where=js.name,
        )
        if js.name.startswith("app.bundle."):
            # Dead once the folder is left out; pointed below the prefix all the same.
            text = _replace(
                text,
                MICROSCOPY_IMPORT,
                f"browserImportFunction('{prefix}dicom-microscopy-viewer/",
                count=expected.microscopy_imports,
                where=js.name,
            )
        js.write_text(text, encoding="utf-8")
        rewritten += 1
    if rewritten != expected.public_path_files:
        raise OhifInstallError(
            f"expected the webpack public path in {expected.public_path_files} bundles, "
            f"found it in {rewritten}: not the build this install was written for"
        )

    css = site / "app.bundle.css"
    _write(
        css,
        _replace(
            _read(css), "url(/", f"url({prefix}", count=expected.css_root_urls, where=css.name
        ),
    )
    manifest = site / "manifest.json"
    _write(
        manifest,
        _replace(
            _read(manifest),
            '"/assets/',
            f'"{prefix}assets/',
            count=expected.manifest_icons,
            where=manifest.name,
        ),
    )

    index = site / "index.html"
    html = _read(index)
    html = _replace(
        html, INLINE_TIMER, '<script src="/relay-boot.js"></script>', count=1, where="index.html"
    )
    html = _replace(html, INLINE_IMPORT, "", count=1, where="index.html")
    html = _replace(html, SERVICE_WORKER_TAG, "", count=1, where="index.html")
    found = len(ROOT_ATTRIBUTE.findall(html))
    if found != expected.html_root_attributes + 1:  # + relay-boot.js
        raise OhifInstallError(
            f"index.html: expected {expected.html_root_attributes} root paths, "
            f"found {found - 1}: not the build this install was written for"
        )
    html = ROOT_ATTRIBUTE.sub(rf'\1="{prefix}', html)
    if "<script>" in html:
        raise OhifInstallError("index.html: an inline script is left (the CSP forbids it)")
    _write(index, html)
    _write(site / "relay-boot.js", BOOT_JS)
    _write(site / "app-config.js", APP_CONFIG)


def _read(path: Path) -> str:
    if not path.is_file():
        raise OhifInstallError(
            f"{path.name} is missing: not the build this install was written for"
        )
    return path.read_text(encoding="utf-8")


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def ohif_install(
    *, base: Path | None = None, npm: str = "npm", force: bool = False, tarball: Path | None = None
) -> bool:
    """Install the pinned OHIF under base/site (default settings.RELAY_OHIF_DIR). Returns False
    when that version is already installed (nothing done), True after an install. `tarball`
    skips `npm pack` (an offline copy); it is verified all the same."""
    base = base or ohif_dir()
    if not force and installed_version(base) == OHIF_VERSION:
        return False
    if tarball is None:
        tarball = base / f"ohif-app-{OHIF_VERSION}.tgz"
        if not tarball.is_file() or sri_sha512(tarball) != OHIF_INTEGRITY:
            tarball.unlink(missing_ok=True)
            tarball = tarball_fetch(dest=base, npm=npm)
    tarball_verify(tarball)
    staging = base / "site.new"
    try:
        dist_extract(tarball, dest=staging)
        site_rewrite(staging)
        _write(
            staging / MARKER,
            json.dumps({"version": OHIF_VERSION, "integrity": OHIF_INTEGRITY}) + "\n",
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    site = site_dir(base)
    old = base / "site.old"
    shutil.rmtree(old, ignore_errors=True)
    if site.exists():
        site.rename(old)
    staging.rename(site)
    shutil.rmtree(old, ignore_errors=True)
    return True
