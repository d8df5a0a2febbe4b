"""A fake OHIF build shaped like @ohif/app 3.13.2's dist (the strings the install rewrites, the
expected number of times), and a fake installed site, so the install's checks and the serving
view are tested without the 50 MB package."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from transfers.ohif import install

PUBLIC_PATH_BUNDLES = [
    "app.bundle.0f6159c501addfe9.js",
    "136.bundle.b948da0438a0a660.js",
    "2299.bundle.2375af8b16a1702e.js",
    "8097.bundle.8ae6404ba94890a0.js",
    "compute.bundle.0fc3a3ee85296cf2.js",
    "histogram-worker.bundle.ec5f0cf05ce3909c.js",
    "interpolation.bundle.fa54018d8628f8c0.js",
    "polySeg.bundle.2c5892e4c5a6bdd5.js",
]


def fake_dist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in PUBLIC_PATH_BUNDLES:
        extra = (
            "browserImportFunction('/dicom-microscopy-viewer/dicomMicroscopyViewer.min.js');"
            if name.startswith("app.bundle.")
            else ""
        )
        (folder / name).write_text(f'(()=>{{__webpack_require__.p = "/";{extra}}})();')
    (folder / "100.bundle.cb02411ce321d4e4.js").write_text("console.log(1);")
    (folder / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm\1\0\0\0")
    (folder / "app.bundle.css").write_text(
        "".join("@font-face{src:url(/a.woff2)}" for _ in range(5))
    )
    icons = ", ".join(f'{{"src": "/assets/icon-{n}.png"}}' for n in range(9))
    (folder / "manifest.json").write_text(f'{{"icons": [{icons}]}}')
    links = "".join(f'<link rel="icon" href="/assets/i{n}.png">' for n in range(27))
    (folder / "index.html").write_text(
        '<!doctype html><html><head><meta name="a" content="/assets/t.png">'
        '<meta name="b" content="/assets/b.xml">'
        + install.INLINE_TIMER
        + links
        + '<script rel="preload" as="script" src="/app-config.js"></script>'
        + install.SERVICE_WORKER_TAG
        + "<title>OHIF Viewer</title>"
        + install.INLINE_IMPORT
        + '<script defer src="/app.bundle.0f6159c501addfe9.js"></script>'
        + '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div></body></html>'
    )
    return folder


def fake_tarball(path: Path, dist: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A .tgz laid out like npm's: package/package.json and package/dist/..."""
    with tarfile.open(path, "w:gz") as archive:
        archive.add(dist, arcname="package/dist")
        for name, data in {
            "package/package.json": b'{"name": "@ohif/app"}',
            **(extra or {}),
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def ohif_site(settings: Any, tmp_path: Path) -> Path:
    """An installed site (the install run on a fake build) where settings point."""
    base = tmp_path / "ohif-installed"
    site = fake_dist(base / "site")
    install.site_rewrite(site)
    (site / install.MARKER).write_text(json.dumps({"version": install.OHIF_VERSION}))
    settings.RELAY_OHIF_DIR = base
    return site
