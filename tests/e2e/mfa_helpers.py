"""Helpers for the second-factor tests in real Chromium: the live server under the name
"localhost" (WebAuthn's relying-party id must be a domain, not an address), Chromium's virtual
authenticator (a security key or passkey that answers without a person touching it), and the
sign-in and sign-out a person does on the pages."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from playwright.sync_api import expect

from tests.helpers import PASSWORD, totp_code


def localhost_url(live_server: Any) -> str:
    """The live server's address under the host name "localhost" (pytest-django's default; an
    address given with --liveserver is renamed): allauth takes the relying-party id from the Host
    header, and browsers allow WebAuthn over plain http only on localhost."""
    parts = urlsplit(str(live_server.url))
    return f"http://localhost:{parts.port}"


@dataclass
class VirtualAuthenticator:
    """Chromium's virtual authenticator on one page (DevTools protocol, domain WebAuthn)."""

    cdp: Any
    authenticator_id: str

    def credentials(self) -> list[dict[str, Any]]:
        answer = self.cdp.send(
            "WebAuthn.getCredentials", {"authenticatorId": self.authenticator_id}
        )
        return list(answer["credentials"])


def virtual_authenticator(page: Any, *, transport: str = "usb") -> VirtualAuthenticator:
    """A CTAP2 authenticator that keeps resident keys (passkeys), verifies its user (as a PIN or
    a fingerprint would) and answers every request at once, as if touched."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    answer = cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": transport,
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    return VirtualAuthenticator(cdp=cdp, authenticator_id=answer["authenticatorId"])


def sign_in_with_password(page: Any, base: str, email: str, *, path: str = "/studies/") -> None:
    """Open `path` signed out, land on the sign-in page and type e-mail and password."""
    page.goto(f"{base}{path}")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()


def sign_out(page: Any, base: str) -> None:
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(re.escape(f"{base}/accounts/login/")))


def status_of(page: Any, url: str) -> tuple[int, str]:
    """What the server answers the browser's session for `url`, redirects not followed: the
    status and the Location header ("" without one)."""
    response = page.request.get(url, max_redirects=0)
    return response.status, response.headers.get("location", "")


def second_factor_panel(page: Any, title: str) -> Any:
    """One panel ("Authenticator App", "Security Keys", "Recovery Codes") of allauth's
    second-factor page."""
    return page.locator("section").filter(has=page.get_by_role("heading", name=title, exact=True))


def fresh_totp_code(secret: str, *, period: int = 30, margin: float = 3.0) -> str:
    """The code the app shows, taken as a person does: when the app's countdown is nearly out,
    wait for the next code (the server accepts only the current 30-second step)."""
    left = period - time.time() % period
    if left < margin:
        time.sleep(left + 0.1)
    return totp_code(secret)
