"""The second factor, end to end: real Chromium on the live server, allauth's own pages.

Security keys and passkeys are Chromium's virtual authenticator (DevTools protocol), which signs
with real keys as a USB key would; the authenticator app is tests.helpers.totp_code, written from
RFC 6238 apart from the library under test. Screenshots of each step go to
$RELAY_ARTEFACTS/second_factor (or the test's tmp_path).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from portal.models import AuditAction, AuditEvent, Facility, Outcome, User
from tests.e2e.mfa_helpers import (
    fresh_totp_code,
    localhost_url,
    second_factor_panel,
    sign_in_with_password,
    sign_out,
    status_of,
    virtual_authenticator,
)
from tests.helpers import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _webauthn_over_http(settings: Any) -> None:
    # The live server speaks http; browsers allow WebAuthn on http://localhost, allauth (fido2)
    # only with this setting.
    settings.MFA_WEBAUTHN_ALLOW_INSECURE_ORIGIN = True
    assert "localhost" in settings.ALLOWED_HOSTS


@pytest.fixture
def base(live_server: Any) -> str:
    return localhost_url(live_server)


@pytest.fixture
def shots(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    root = Path(os.environ["RELAY_ARTEFACTS"]) if os.environ.get("RELAY_ARTEFACTS") else tmp_path
    folder = root / "second_factor" / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of {request.node.name}: {folder}")
    count = iter(range(1, 100))

    def shot(page: Any, name: str) -> None:
        page.screenshot(path=str(folder / f"{next(count):02d}-{name}.png"), full_page=True)

    return shot


def _confirm_password_if_asked(page: Any) -> None:
    """Adding a second factor asks for the password again once the sign-in is older than
    RELAY_REAUTH_SECONDS; right after signing in it does not (the sign-in counts)."""
    page.wait_for_load_state()
    if "/accounts/reauthenticate/" in page.url:
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Confirm").click()


def _add_security_key(page: Any, base: str, shots: Any, *, passwordless: bool) -> list[str]:
    """From the second-factor page: add the (virtual) key; answer the recovery codes shown."""
    second_factor_panel(page, "Security Keys").get_by_role("link", name="Add").click()
    shots(page, "confirm-access")
    _confirm_password_if_asked(page)
    expect(page).to_have_url(f"{base}/accounts/2fa/webauthn/add/")
    if passwordless:
        page.get_by_label("Passwordless").check()
    shots(page, "add-key")
    page.get_by_role("button", name="Add").click()

    # The key is added and, with it, recovery codes are made and shown.
    expect(page).to_have_url(f"{base}/accounts/2fa/recovery-codes/")
    expect(page.get_by_text("Security key added.")).to_be_visible()
    shots(page, "recovery-codes")
    codes = page.get_by_label("Unused codes").input_value().split()
    assert len(codes) == 10 and all(re.fullmatch(r"\d{8}", code) for code in codes), codes
    return codes


def _added(user: User) -> list[str]:
    events = AuditEvent.objects.filter(action=AuditAction.MFA_ADD, actor=user)
    return sorted(event.detail["type"] for event in events)


# The security-key form posted with an answer no key made (as a script on the page could).
FORGED_KEY_ANSWER = """() => {
    const form = document.getElementById("webauthn_form");
    form.querySelector("[name=credential]").value = JSON.stringify({
        id: "AAAA", rawId: "AAAA", type: "public-key",
        response: {clientDataJSON: "AAAA", authenticatorData: "AAAA", signature: "AAAA"},
    });
    form.submit();
}"""


def _failures(user: User) -> int:
    """Failures django-axes counts toward the account's lockout."""
    from axes.models import AccessAttempt

    return sum(
        AccessAttempt.objects.filter(username=user.email).values_list(
            "failures_since_start", flat=True
        )
    )


def _logins(user: User) -> int:
    return AuditEvent.objects.filter(action=AuditAction.LOGIN, actor=user).count()


def test_it_adds_a_security_key_and_asks_for_it_at_the_next_sign_in(
    e2e_page: Any, alice: User, krmc: Facility, base: str, shots: Any, e2e_js_errors: list[str]
) -> None:
    page = e2e_page
    key = virtual_authenticator(page)

    # A facility admin's password alone opens nothing but the second-factor pages.
    sign_in_with_password(page, base, alice.email)
    expect(page).to_have_url(f"{base}/accounts/2fa/")
    expect(page.get_by_text("Your account needs a second factor")).to_be_visible()
    shots(page, "second-factor-page")
    for path in ("/studies/", "/inbox/", "/facilities/krmc/audit/"):
        assert status_of(page, f"{base}{path}") == (302, "/accounts/2fa/"), path

    codes = _add_security_key(page, base, shots, passwordless=False)
    (credential,) = key.credentials()
    assert not credential["isResidentCredential"]  # a second factor, not a passkey
    assert _added(alice) == ["recovery_codes", "webauthn"]
    added = AuditEvent.objects.filter(action=AuditAction.MFA_ADD, actor=alice)
    assert {event.facility for event in added} == {krmc}

    sign_out(page, base)
    sign_in_with_password(page, base, alice.email)
    expect(page).to_have_url(re.compile(re.escape(f"{base}/accounts/2fa/authenticate/")))
    shots(page, "asked-for-the-key")
    # Password given, key not yet: still nothing.
    assert status_of(page, f"{base}/studies/")[0] == 302
    # A code that is none of her recovery codes is refused (and audited).
    page.get_by_label("Code").fill(next(c for c in ("00000000", "11111111") if c not in codes))
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert")).to_have_text("Incorrect code.")
    (failed,) = AuditEvent.objects.filter(action=AuditAction.MFA_FAILED, actor=alice)
    assert failed.detail == {"type": "recovery_codes", "reauthentication": False}
    assert _failures(alice) == 1
    # A forged security-key answer is refused, audited, and counts toward the lock as well.
    page.evaluate(FORGED_KEY_ANSWER)
    expect(page.get_by_role("alert")).to_be_visible()
    refused = AuditEvent.objects.filter(action=AuditAction.MFA_FAILED, actor=alice).latest("id")
    assert refused.detail == {"type": "webauthn", "reauthentication": False}
    assert _failures(alice) == 2
    logins = _logins(alice)
    page.get_by_role("button", name="Use a security key").click()
    expect(page).to_have_url(f"{base}/studies/")
    shots(page, "studies")
    assert status_of(page, f"{base}/studies/") == (200, "")
    assert _logins(alice) == logins + 1
    assert e2e_js_errors == []


def test_it_signs_in_with_a_passkey_without_a_password(
    e2e_page: Any, alice: User, base: str, shots: Any, e2e_js_errors: list[str]
) -> None:
    page = e2e_page
    key = virtual_authenticator(page, transport="internal")
    sign_in_with_password(page, base, alice.email)
    expect(page).to_have_url(f"{base}/accounts/2fa/")
    _add_security_key(page, base, shots, passwordless=True)
    (credential,) = key.credentials()
    assert credential["isResidentCredential"]  # a passkey: the key itself names the account
    sign_out(page, base)

    page.goto(f"{base}/studies/")
    expect(page).to_have_url(f"{base}/accounts/login/?next=/studies/")
    shots(page, "sign-in-page")
    logins = _logins(alice)
    page.get_by_role("button", name="Sign in with a passkey").click()
    expect(page).to_have_url(f"{base}/studies/")
    shots(page, "studies")
    # The passkey is both factors: the admin is fully signed in, no password typed.
    assert status_of(page, f"{base}/studies/") == (200, "")
    assert status_of(page, f"{base}/facilities/krmc/audit/") == (200, "")
    assert _logins(alice) == logins + 1
    assert e2e_js_errors == []


def test_a_member_of_a_facility_that_requires_it_enrols_an_authenticator_app(
    e2e_page: Any, bob: User, krmc: Facility, base: str, shots: Any, e2e_js_errors: list[str]
) -> None:
    page = e2e_page
    krmc.require_mfa = True
    krmc.save(update_fields=["require_mfa"])

    sign_in_with_password(page, base, bob.email)
    expect(page).to_have_url(f"{base}/accounts/2fa/")
    assert status_of(page, f"{base}/studies/") == (302, "/accounts/2fa/")
    second_factor_panel(page, "Authenticator App").get_by_role("link", name="Activate").click()
    _confirm_password_if_asked(page)
    expect(page).to_have_url(f"{base}/accounts/2fa/totp/activate/")
    shots(page, "activate-app")
    # What a person types into the app by hand (or the QR code carries).
    secret = page.get_by_label("Authenticator secret").input_value()
    assert re.fullmatch(r"[A-Z2-7]{32}", secret), secret
    page.get_by_label("Authenticator code").fill(fresh_totp_code(secret))
    page.get_by_role("button", name="Activate").click()
    expect(page).to_have_url(f"{base}/accounts/2fa/recovery-codes/")
    shots(page, "recovery-codes")
    assert _added(bob) == ["recovery_codes", "totp"]

    # Activating it took a code from the app: that counts as using it, so he goes on.
    assert status_of(page, f"{base}/studies/") == (200, "")
    sign_out(page, base)

    # Password given, then thought better of it: Cancel ends the half-done sign-in.
    sign_in_with_password(page, base, bob.email)
    expect(page).to_have_url(re.compile(re.escape(f"{base}/accounts/2fa/authenticate/")))
    page.get_by_role("button", name="Cancel and sign out").click()
    expect(page).to_have_url(f"{base}/accounts/login/")
    page.goto(f"{base}/accounts/2fa/authenticate/")
    expect(page).to_have_url(re.compile(re.escape(f"{base}/accounts/login/")))

    sign_in_with_password(page, base, bob.email)
    expect(page).to_have_url(re.compile(re.escape(f"{base}/accounts/2fa/authenticate/")))
    # Only the authenticator app (or a recovery code): no security key is offered.
    expect(page.get_by_role("button", name="Use a security key")).to_have_count(0)
    shots(page, "asked-for-a-code")
    code = fresh_totp_code(secret)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    page.get_by_label("Code").fill(wrong)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert")).to_have_text("Incorrect code.")
    shots(page, "wrong-code")
    expect(page).to_have_url(re.compile(re.escape(f"{base}/accounts/2fa/authenticate/")))
    assert status_of(page, f"{base}/studies/")[0] == 302
    (failed,) = AuditEvent.objects.filter(action=AuditAction.MFA_FAILED, actor=bob)
    assert failed.outcome == Outcome.FAILURE
    assert failed.detail == {"type": "totp", "reauthentication": False}
    assert wrong not in str(failed.detail)

    logins = _logins(bob)
    page.get_by_label("Code").fill(fresh_totp_code(secret))
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(f"{base}/studies/")
    assert status_of(page, f"{base}/studies/") == (200, "")
    assert _logins(bob) == logins + 1
    assert e2e_js_errors == []


def test_staff_without_a_second_factor_reach_the_admin_site_only_through_it(
    e2e_page: Any, base: str, shots: Any, e2e_js_errors: list[str]
) -> None:
    page = e2e_page
    operator = User.objects.create_user(
        email="operator@relay.example", password=PASSWORD, is_staff=True, is_superuser=True
    )
    sign_in_with_password(page, base, operator.email, path="/admin/")
    expect(page).to_have_url(f"{base}/accounts/2fa/")
    shots(page, "second-factor-page")
    for path in ("/admin/", "/admin/portal/user/", "/billing/"):
        assert status_of(page, f"{base}{path}") == (302, "/accounts/2fa/"), path
    assert e2e_js_errors == []
