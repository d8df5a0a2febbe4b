"""Helpers of the five journeys (tests/e2e/test_journeys.py): the two screen sizes, screenshots
of every step, the top bar's menu, signing in through the login form (with an authenticator
code where a second factor is required), the viewer's first image, and the e-mails."""

from __future__ import annotations

import io
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from django.conf import settings
from django.core import mail
from playwright.sync_api import expect

from portal.models import User
from tests.e2e.mfa_helpers import fresh_totp_code
from tests.helpers import totp_enroll, totp_secret
from transfers.ingest import instance_ingest
from transfers.models import Study, StudyStatus

PASSWORD = "e2e journeys 9 lanterns"
# Upload and the viewer's first frame are decoded by the live server; on a loaded two-core CI
# machine a single file once took longer than 30 s (tests/e2e/test_upload_page.py).
SLOW_TIMEOUT = 60_000

SIZES: dict[str, dict[str, Any]] = {
    "desktop": {"viewport": {"width": 1280, "height": 900}},
    "phone": {
        "viewport": {"width": 390, "height": 844},
        "is_mobile": True,
        "has_touch": True,
        "device_scale_factor": 2,
    },
}

# Red channel of the viewer's canvas: how many distinct values (a blank canvas has one).
CANVAS_DISTINCT_JS = """
(selector) => {
  const canvas = document.querySelector(selector);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < data.length; i += 4) seen.add(data[i]);
  return seen.size;
}
"""


def artifacts_root() -> Path:
    """$RELAY_ARTEFACTS, else the clone's var/artifacts (git-ignored)."""
    configured = os.environ.get("RELAY_ARTEFACTS")
    return Path(configured) if configured else Path(settings.BASE_DIR) / "var" / "artifacts"


@dataclass
class Shots:
    """Numbered full-page screenshots of one journey at one size:
    <artifacts>/journeys/<journey>/<size>/NN-<step>.png."""

    folder: Path
    taken: list[Path] = field(default_factory=list)

    def __call__(self, page: Any, step: str) -> Path:
        path = self.folder / f"{len(self.taken) + 1:02d}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        return path


def shots_for(journey: str, size: str) -> Shots:
    folder = artifacts_root() / "journeys" / journey / size
    # A step renamed or removed must not leave last run's picture beside this run's.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"\nscreenshots of {journey} at {size}: {folder}")
    return Shots(folder)


@dataclass
class Browser:
    """New contexts at the journey's size; each collects the page's uncaught JavaScript errors."""

    browser: Any
    size: str
    js_errors: list[str] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)

    def new_page(self) -> Any:
        context = self.browser.new_context(**SIZES[self.size], accept_downloads=True)
        context.set_default_timeout(15_000)
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: self.js_errors.append(f"{page.url}: {error.stack}"))
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


def sign_in(page: Any, base: str, user: User, *, second_factor: bool = False) -> None:
    """From the home page, signed out: the login form, then (where required) the code of the
    user's authenticator app; lands on Home."""
    # The authenticator app was set up before (tests.helpers.totp_enroll, as an earlier visit
    # to the second-factor page would have).
    secret = totp_secret(totp_enroll(user)) if second_factor else ""
    page.goto(f"{base}/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.fill("input[name=login]", user.email)
    page.fill("input[name=password]", PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    if second_factor:
        expect(page).to_have_url(re.compile(r"/accounts/2fa/authenticate/"))
        page.get_by_label("Code").fill(fresh_totp_code(secret))
        page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(f"{base}/")
    expect(page.get_by_role("heading", name="Home", level=1)).to_be_visible()


def first_image_drawn(page: Any) -> None:
    """The viewer has drawn its first image (static/js/viewer marks the viewport) and the canvas
    holds a picture, not one flat colour."""
    viewport = page.locator("#vp0")
    expect(viewport).to_have_attribute("data-drawn-index", "0", timeout=SLOW_TIMEOUT)
    expect(viewport).to_have_attribute("data-state", "ready")
    assert page.evaluate(CANVAS_DISTINCT_JS, "#vp0 canvas") > 20


def store_complete(facility: Any, user: User, files: list[bytes]) -> Study:
    """Stored as an upload would store them, and complete (as the upload's manifest makes it)."""
    for data in files:
        result = instance_ingest(facility=facility, user=user, chunks=[data])
        assert result.status == "stored", result
    uid = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True).StudyInstanceUID
    study = Study.objects.get(facility=facility, study_instance_uid=str(uid))
    Study.objects.filter(pk=study.pk).update(status=StudyStatus.COMPLETE)
    study.refresh_from_db()
    return study


def newest_mail_to(address: str) -> Any:
    sent = [message for message in mail.outbox if address in message.to]
    assert sent, [message.to for message in mail.outbox]
    return sent[-1]
