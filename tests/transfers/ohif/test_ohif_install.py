"""The install of OHIF's build (transfers/ohif/install.py): a fake build shaped like the pinned
one is rewritten for /ohif/; a build that differs in any rewritten string stops the install with
what was expected; the tarball must match its pinned integrity; what is left out stays out; a
second run of the same version does nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.transfers.ohif.conftest import PUBLIC_PATH_BUNDLES, fake_dist, fake_tarball
from transfers.ohif import install
from transfers.ohif.install import OhifInstallError


def test_it_rewrites_the_root_paths_for_ohif(tmp_path: Path) -> None:
    site = fake_dist(tmp_path / "site")
    install.site_rewrite(site)
    html = (site / "index.html").read_text()
    assert "<script>" not in html  # no inline script left for the CSP to allow
    assert not re.search(r'(href|src|content)="/(?!ohif/)', html)
    assert '<script src="/ohif/relay-boot.js"></script>' in html
    assert "init-service-worker" not in html
    assert 'window.PUBLIC_URL="/ohif/"' in (site / "relay-boot.js").read_text()
    for name in PUBLIC_PATH_BUNDLES:
        assert '__webpack_require__.p = "/ohif/";' in (site / name).read_text()
    assert "url(/ohif/a.woff2)" in (site / "app.bundle.css").read_text()
    assert '"/ohif/assets/icon-0.png"' in (site / "manifest.json").read_text()
    config = (site / "app-config.js").read_text()
    assert "routerBasename: '/ohif'" in config
    assert "qidoRoot: '/dicom-web'" in config and "wadoRoot: '/dicom-web'" in config


def _drop_public_path(site: Path) -> None:
    (site / PUBLIC_PATH_BUNDLES[3]).write_text("/* a bundle that moved its public path */")


def _one_font_less(site: Path) -> None:
    css = site / "app.bundle.css"
    css.write_text(css.read_text().replace("url(/", "url(", 1))


def _inline_script_changed(site: Path) -> None:
    index = site / "index.html"
    index.write_text(index.read_text().replace(install.INLINE_IMPORT, "<script>boot()</script>"))


def _extra_root_link(site: Path) -> None:
    index = site / "index.html"
    index.write_text(index.read_text().replace("<title>", '<link href="/new.css"><title>'))


def _no_manifest(site: Path) -> None:
    (site / "manifest.json").unlink()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop_public_path, "webpack public path in 8 bundles, found it in 7"),
        (_one_font_less, "app.bundle.css: expected 'url(/' 5 time(s), found 4"),
        (_inline_script_changed, "index.html: expected '<script>function browserImportFunction"),
        (_extra_root_link, "index.html: expected 32 root paths, found 33"),
        (_no_manifest, "manifest.json is missing"),
    ],
)
def test_it_fails_loudly_on_a_build_it_was_not_written_for(
    tmp_path: Path, change: object, message: str
) -> None:
    site = fake_dist(tmp_path / "site")
    change(site)  # type: ignore[operator]
    with pytest.raises(OhifInstallError) as error:
        install.site_rewrite(site)
    assert message in str(error.value)
    assert "not the build this install was written for" in str(error.value)


def test_it_refuses_a_tarball_that_is_not_the_pinned_one(tmp_path: Path) -> None:
    tarball = fake_tarball(tmp_path / "ohif-app-3.13.2.tgz", fake_dist(tmp_path / "dist"))
    with pytest.raises(CommandError, match="is not the pinned @ohif/app 3.13.2: integrity sha512-"):
        call_command("ohif_install", dir=tmp_path / "ohif", tarball=tarball)
    assert not (tmp_path / "ohif" / "site").exists()
    assert not install.ohif_installed(tmp_path / "ohif")


def test_it_installs_once_without_what_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dist = fake_dist(tmp_path / "dist")
    for left_out in ("ort/ort-wasm-simd.wasm", "dicom-microscopy-viewer/viewer.js"):
        (dist / left_out).parent.mkdir(parents=True, exist_ok=True)
        (dist / left_out).write_bytes(b"big")
    for name in (
        "app.bundle.0f6159c501addfe9.js.map",
        "sw.js",
        "serve.json",
        "_headers",
        "google.js",
    ):
        (dist / name).write_text("{}")
    tarball = fake_tarball(tmp_path / "ohif-app.tgz", dist)
    monkeypatch.setattr(install, "OHIF_INTEGRITY", install.sri_sha512(tarball))
    base = tmp_path / "ohif"

    call_command("ohif_install", dir=base, tarball=tarball)
    site = base / "site"
    assert install.installed_version(base) == install.OHIF_VERSION
    assert "installed in" in capsys.readouterr().out
    for left_out in (
        "ort",
        "dicom-microscopy-viewer",
        "sw.js",
        "serve.json",
        "_headers",
        "google.js",
    ):
        assert not (site / left_out).exists(), left_out
    assert not list(site.rglob("*.map"))
    assert (site / "0ddf166f7a343eda.wasm").is_file()

    (site / "index.html").write_text("changed by hand")
    call_command("ohif_install", dir=base, tarball=tarball)
    assert "already installed" in capsys.readouterr().out
    assert (site / "index.html").read_text() == "changed by hand"  # nothing was done
    call_command("ohif_install", dir=base, tarball=tarball, force=True)
    assert "relay-boot.js" in (site / "index.html").read_text()
    assert not (base / "site.new").exists() and not (base / "site.old").exists()


def test_a_tarball_member_cannot_leave_the_folder(tmp_path: Path) -> None:
    dist = fake_dist(tmp_path / "dist")
    tarball = fake_tarball(
        tmp_path / "ohif-app.tgz", dist, {"package/dist/../../../escaped.txt": b"x"}
    )
    with pytest.raises(OhifInstallError, match="outside the destination"):
        install.dist_extract(tarball, dest=tmp_path / "out" / "site")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_a_failed_rewrite_leaves_the_installed_site_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = fake_dist(tmp_path / "dist")
    good = fake_tarball(tmp_path / "good.tgz", dist)
    monkeypatch.setattr(install, "OHIF_INTEGRITY", install.sri_sha512(good))
    base = tmp_path / "ohif"
    assert install.ohif_install(base=base, tarball=good)
    _one_font_less(dist)
    bad = fake_tarball(tmp_path / "bad.tgz", dist)
    monkeypatch.setattr(install, "OHIF_INTEGRITY", install.sri_sha512(bad))
    with pytest.raises(OhifInstallError):
        install.ohif_install(base=base, tarball=bad, force=True)
    assert install.ohif_installed(base)
    assert (base / "site" / "relay-boot.js").is_file()
    assert not (base / "site.new").exists()
