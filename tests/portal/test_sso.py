"""Single sign-on through a facility's own OpenID Connect provider, end to end.

A real provider (node-oidc-provider, tests/peers/oidc) runs on loopback; Relay's side is
django-allauth's openid_connect provider configured the way the operator does it, as a SocialApp
in the database plus the facility's SingleSignOn entry. The Django test client plays the browser
at Relay and the fixture's `login()` plays the person at the provider's sign-in page.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from allauth.account.models import EmailAddress
from allauth.socialaccount.models import SocialAccount, SocialApp
from django.test import Client
from django.utils.html import escape

from portal.models import AuditEvent, Facility, Membership, SingleSignOn, User
from tests.helpers import PASSWORD, client_for, totp_code, totp_enroll, totp_secret
from tests.oidc_provider import DEFAULT_ACCOUNTS, OidcProvider, start_oidc_provider
from tests.oidc_provider import oidc_provider_fixture as oidc_provider_fixture  # the fixture

PROVIDER_ID = "krmc-idp"
APP_NAME = "Kalispell Regional (single sign-on)"
START = f"/accounts/oidc/{PROVIDER_ID}/login/"
CALLBACK = f"http://testserver/accounts/oidc/{PROVIDER_ID}/login/callback/"
ROLE_MAP = {"admin": "admin", "sender": "sender", "reader": "reader"}
# Besides the default accounts: someone whose address is outside Kalispell's domains, and one
# the provider sends without a role claim.
ACCOUNTS: list[dict[str, Any]] = [
    *DEFAULT_ACCOUNTS,
    {
        "sub": "idp-erin-elsewhere",
        "email": "erin@elsewhere.example",
        "email_verified": True,
        "name": "Erin Elsewhere",
        "relay_role": "admin",
    },
    {"sub": "idp-frank", "email": "frank@krmc.example", "email_verified": True, "name": "Frank"},
]


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcProvider]:
    """One provider for the tests that need no other client or accounts (every sign-in starts
    from a fresh browser at the provider); `oidc_provider` gives a test its own."""
    with start_oidc_provider(redirect_uris=[CALLBACK], accounts=ACCOUNTS) as provider:
        yield provider


def _set_up(
    provider: OidcProvider,
    facility: Facility,
    *,
    secret: str | None = None,
    app_settings: dict[str, Any] | None = None,
    **sso: Any,
) -> SingleSignOn:
    """The facility's single sign-on as the operator sets it up in the admin."""
    app = SocialApp.objects.create(
        provider="openid_connect",
        provider_id=PROVIDER_ID,
        name=APP_NAME,
        client_id=provider.client_id,
        secret=provider.client_secret if secret is None else secret,
        settings={"server_url": provider.issuer, **(app_settings or {})},
    )
    options: dict[str, Any] = {
        "email_domains": "krmc.example",
        "role_claim": "relay_role",
        "role_map": ROLE_MAP,
        "default_role": "viewer",
    }
    return SingleSignOn.objects.create(facility=facility, app=app, **(options | sso))


def _start(client: Client) -> str:
    """Press the facility's button on Relay's sign-in page: the provider's authorization URL."""
    response = client.post(START)
    assert response.status_code == 302
    return str(response["Location"])


def _sign_in(client: Client, provider: OidcProvider, email: str) -> Any:
    """The whole sign-in: Relay -> the provider's page as `email` -> back to Relay, redirects
    followed on Relay's side."""
    callback = provider.login(_start(client), email)
    assert callback.startswith(CALLBACK + "?"), callback
    return client.get(callback.removeprefix("http://testserver"), follow=True)


def _signed_in_as(client: Client) -> User | None:
    user_id = client.session.get("_auth_user_id")
    return User.objects.get(pk=user_id) if user_id else None


# --- a newcomer --------------------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize(
    ("email", "role_map", "role"),
    [
        ("erin@krmc.example", ROLE_MAP, "reader"),  # relay_role "reader", mapped
        ("erin@krmc.example", {"admin": "admin"}, "viewer"),  # a value the facility did not map
        ("frank@krmc.example", ROLE_MAP, "viewer"),  # no relay_role claim at all
    ],
    ids=["mapped-claim", "unmapped-claim", "no-claim"],
)
def test_it_makes_a_newcomer_a_member(
    idp: OidcProvider, krmc: Facility, email: str, role_map: dict[str, str], role: str
) -> None:
    _set_up(idp, krmc, role_map=role_map)
    client = Client()

    response = _sign_in(client, idp, email)

    assert response.status_code == 200
    assert response.redirect_chain[-1] == ("/", 302)
    user = User.objects.get(email=email)
    assert _signed_in_as(client) == user
    assert not user.has_usable_password()  # SSO only, until they ask for a password
    assert user.full_name  # the provider's name claim
    membership = Membership.objects.get(user=user)
    assert (membership.facility, membership.role) == (krmc, role)
    assert SocialAccount.objects.get(user=user).provider == PROVIDER_ID
    assert AuditEvent.objects.filter(action="login", actor=user).count() == 1
    join = AuditEvent.objects.get(action="member_join", actor=user)
    assert join.facility == krmc
    assert join.detail == {"via": "sso", "provider": PROVIDER_ID, "role": role}


# --- an existing member ------------------------------------------------------------------------


@pytest.mark.peer
def test_it_signs_an_existing_member_into_their_own_account(
    idp: OidcProvider, krmc: Facility, bob: User
) -> None:
    # bob's admin made him a reader; the provider calls him a "sender", which Kalispell has not
    # mapped yet.
    Membership.objects.filter(user=bob).update(role="reader")
    sso = _set_up(idp, krmc, role_map={"admin": "admin", "reader": "reader"})

    first = Client()
    assert _sign_in(first, idp, "bob@krmc.example").redirect_chain[-1] == ("/", 302)

    assert _signed_in_as(first) == bob
    assert User.objects.filter(email__iexact="bob@krmc.example").count() == 1
    assert SocialAccount.objects.get(provider=PROVIDER_ID).user == bob
    assert Membership.objects.get(user=bob).role == "reader"
    assert not AuditEvent.objects.filter(action="member_change").exists()
    assert not AuditEvent.objects.filter(action="member_join").exists()
    # His password still works: allauth would wipe it, taking an account whose address nobody
    # verified for one opened with somebody else's address; his came from an invitation.
    bob.refresh_from_db()
    assert bob.check_password(PASSWORD)
    assert EmailAddress.objects.get(user=bob).verified

    # Kalispell maps "sender" now: at the next sign-in (through the linked identity) it applies.
    sso.role_map = ROLE_MAP
    sso.save()
    second = Client()
    _sign_in(second, idp, "bob@krmc.example")

    assert _signed_in_as(second) == bob
    assert Membership.objects.get(user=bob).role == "sender"
    change = AuditEvent.objects.get(action="member_change")
    assert (change.actor, change.facility) == (bob, krmc)
    assert change.detail == {
        "via": "sso",
        "provider": PROVIDER_ID,
        "member": "bob@krmc.example",
        "before": "reader",
        "after": "sender",
    }


# --- refusals ----------------------------------------------------------------------------------


def _assert_refused(response: Any, client: Client, email: str, reason: str, facility: Any) -> None:
    assert response.status_code == 403
    assert b"Single sign-on refused" in response.content
    assert escape(reason).encode() in response.content
    assert _signed_in_as(client) is None
    assert not SocialAccount.objects.exists()
    assert not AuditEvent.objects.filter(action="login").exists()
    failed = AuditEvent.objects.get(action="login_failed")
    assert (failed.outcome, failed.actor, failed.facility) == ("failure", None, facility)
    assert failed.actor_email == email
    assert failed.detail == {
        "email": email,
        "via": "sso",
        "provider": PROVIDER_ID,
        "reason": reason,
    }


@pytest.mark.peer
@pytest.mark.parametrize(
    ("email", "reason"),
    [
        ("unverified@krmc.example", "address not verified by the provider"),
        ("erin@elsewhere.example", "address outside the facility's e-mail domains"),
    ],
    ids=["unverified", "outside-domains"],
)
def test_it_refuses_an_address_it_cannot_trust(
    idp: OidcProvider, krmc: Facility, email: str, reason: str
) -> None:
    _set_up(idp, krmc)
    client = Client()

    response = _sign_in(client, idp, email)

    _assert_refused(response, client, email, reason, krmc)
    assert not User.objects.filter(email__iexact=email).exists()
    assert not Membership.objects.exists()


@pytest.mark.peer
@pytest.mark.parametrize(
    "oidc_provider",
    [
        {
            "redirect_uris": [CALLBACK],
            # Some providers send the flag as a string: "false" must not pass for verified.
            "accounts": [{"sub": "idp-b", "email": "bob@krmc.example", "email_verified": "false"}],
        }
    ],
    indirect=True,
)
def test_it_refuses_an_address_verified_only_as_the_string_false(
    oidc_provider: OidcProvider, krmc: Facility, bob: User
) -> None:
    _set_up(oidc_provider, krmc)
    client = Client()

    response = _sign_in(client, oidc_provider, "bob@krmc.example")

    _assert_refused(
        response, client, "bob@krmc.example", "address not verified by the provider", krmc
    )
    bob.refresh_from_db()
    assert bob.check_password(PASSWORD)


@pytest.mark.peer
def test_it_refuses_once_the_facility_switches_it_off(idp: OidcProvider, krmc: Facility) -> None:
    sso = _set_up(idp, krmc)
    client = Client()
    authorize = _start(client)
    # Switched off while someone is at the provider's page: their return is refused too.
    sso.enabled = False
    sso.save()

    callback = idp.login(authorize, "erin@krmc.example")
    response = client.get(callback.removeprefix("http://testserver"), follow=True)

    _assert_refused(
        response,
        client,
        "erin@krmc.example",
        "single sign-on is switched off for the facility",
        krmc,
    )
    assert not User.objects.filter(email="erin@krmc.example").exists()


@pytest.mark.peer
def test_it_refuses_an_address_someone_added_to_their_own_account(
    idp: OidcProvider, krmc: Facility, charlie: User
) -> None:
    # An unverified second address on charlie's (Great Falls) account: the e-mail page is closed
    # in Relay, but allauth's table can hold one (the operator's admin, an older page). allauth
    # matches erin's first sign-in to that address, so she would be signed into charlie's account
    # and that account would become a Kalispell member.
    EmailAddress.objects.create(user=charlie, email="erin@krmc.example", verified=False)
    _set_up(idp, krmc)
    client = Client()

    response = _sign_in(client, idp, "erin@krmc.example")

    _assert_refused(
        response, client, "erin@krmc.example", "address belongs to another Relay account", krmc
    )
    assert not Membership.objects.filter(user=charlie, facility=krmc).exists()
    charlie.refresh_from_db()
    assert charlie.check_password(PASSWORD)


@pytest.mark.peer
def test_it_refuses_to_link_an_identity_to_whoever_is_signed_in(
    idp: OidcProvider, krmc: Facility, charlie: User
) -> None:
    _set_up(idp, krmc)
    client = client_for(charlie)
    response = client.post(START, {"process": "connect"})
    assert response.status_code == 302

    callback = idp.login(str(response["Location"]), "erin@krmc.example")
    refused = client.get(callback.removeprefix("http://testserver"), follow=True)

    assert refused.status_code == 403
    assert b"Single sign-on refused" in refused.content
    assert not SocialAccount.objects.exists()
    assert not Membership.objects.filter(user=charlie, facility=krmc).exists()
    failed = AuditEvent.objects.get(action="login_failed")
    assert failed.facility == krmc
    assert failed.detail["reason"] == "linking a provider identity to a signed-in account"


# --- what allauth checks of the provider's answer -----------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize(
    "setup",
    [
        # The provider does not hand tokens to a client that cannot prove it is Relay.
        {"secret": "not-the-client-secret"},
        # An ID token whose issuer is not the one Relay was set up with is not taken.
        {
            "app_settings": {
                "openid_configuration_overrides": {"issuer": "https://idp.krmc.example"}
            }
        },
    ],
    ids=["wrong-client-secret", "other-issuer"],
)
def test_it_signs_nobody_in_when_the_token_exchange_fails(
    idp: OidcProvider, krmc: Facility, setup: dict[str, Any]
) -> None:
    _set_up(idp, krmc, **setup)
    client = Client()

    response = _sign_in(client, idp, "erin@krmc.example")

    assert "socialaccount/authentication_error.html" in [t.name for t in response.templates]
    assert _signed_in_as(client) is None
    assert not User.objects.filter(email="erin@krmc.example").exists()
    assert not SocialAccount.objects.exists()
    assert not AuditEvent.objects.filter(action="login").exists()
    _assert_broken_off_audited(krmc)


def _assert_broken_off_audited(facility: Facility) -> None:
    failed = AuditEvent.objects.get(action="login_failed")
    assert (failed.outcome, failed.actor, failed.facility) == ("failure", None, facility)
    assert failed.detail["via"] == "sso"
    assert failed.detail["reason"].startswith("the sign-in at the provider did not complete")


@pytest.mark.peer
def test_it_refuses_a_callback_opened_in_another_browser(idp: OidcProvider, krmc: Facility) -> None:
    # Someone else's (or an attacker's own) sign-in, replayed into this browser: the state it
    # carries was never handed out to this session.
    _set_up(idp, krmc)
    callback = idp.login(_start(Client()), "erin@krmc.example")

    other = Client()
    other.get(callback.removeprefix("http://testserver"), follow=True)

    assert _signed_in_as(other) is None
    assert not User.objects.filter(email="erin@krmc.example").exists()
    _assert_broken_off_audited(krmc)


@pytest.mark.peer
def test_it_sends_a_code_challenge(idp: OidcProvider, krmc: Facility) -> None:
    # PKCE (SOCIALACCOUNT_PROVIDERS["openid_connect"]["OAUTH_PKCE_ENABLED"]): a code caught on
    # its way back cannot be redeemed without the verifier that stayed in Relay's session.
    _set_up(idp, krmc)

    query = parse_qs(urlsplit(_start(Client())).query)

    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) >= 43


# --- second factor -----------------------------------------------------------------------------


@pytest.mark.peer
def test_it_holds_a_facility_admin_to_relays_second_factor(
    idp: OidcProvider, krmc: Facility, alice: User
) -> None:
    _set_up(idp, krmc)
    client = Client()

    response = _sign_in(client, idp, "alice@krmc.example")

    # Signed in, but with no second factor yet: every page sends her to set one up.
    assert _signed_in_as(client) == alice
    assert response.redirect_chain[-1] == ("/accounts/2fa/", 302)
    studies = client.get("/studies/")
    assert studies.status_code == 302
    assert studies["Location"] == "/accounts/2fa/"
    assert client.get("/facilities/krmc/audit/")["Location"] == "/accounts/2fa/"


@pytest.mark.peer
def test_it_asks_a_facility_admin_with_an_authenticator_for_a_code(
    idp: OidcProvider, krmc: Facility, alice: User
) -> None:
    Membership.objects.filter(user=alice).update(role="sender")
    secret = totp_secret(totp_enroll(alice))
    _set_up(idp, krmc)
    client = Client()

    response = _sign_in(client, idp, "alice@krmc.example")

    # The provider's word alone opens nothing: Relay asks for her authenticator's code.
    assert response.redirect_chain[-1] == ("/accounts/2fa/authenticate/", 302)
    assert _signed_in_as(client) is None
    assert client.get("/studies/")["Location"].startswith("/accounts/login/")
    assert not AuditEvent.objects.filter(action="login").exists()

    done = client.post("/accounts/2fa/authenticate/", {"code": totp_code(secret)}, follow=True)

    assert done.redirect_chain[-1] == ("/", 302)
    assert _signed_in_as(client) == alice
    assert client.get("/studies/").status_code == 200
    # The role claim (relay_role "admin") applies once the sign-in is complete.
    assert Membership.objects.get(user=alice).role == "admin"
    assert AuditEvent.objects.get(action="member_change").detail["after"] == "admin"


# --- the sign-in page --------------------------------------------------------------------------


@pytest.mark.peer
def test_it_lists_the_facilitys_button_on_the_sign_in_page(
    idp: OidcProvider, krmc: Facility
) -> None:
    sso = _set_up(idp, krmc)

    page = Client().get("/accounts/login/")

    assert page.status_code == 200
    assert APP_NAME.encode() in page.content
    assert START.encode() in page.content
    # Switched off, the button goes (a sign-in already under way is refused, as above).
    sso.enabled = False
    sso.save()
    assert START.encode() not in Client().get("/accounts/login/").content


# --- the operator's admin page -----------------------------------------------------------------


def test_the_operator_sets_it_up_in_the_admin_and_the_trail_keeps_no_secret(
    admin_client: Client, krmc: Facility
) -> None:
    app = SocialApp.objects.create(
        provider="openid_connect",
        provider_id=PROVIDER_ID,
        name=APP_NAME,
        client_id="relay-krmc",
        secret="the-client-secret-value",
        settings={"server_url": "https://idp.krmc.example"},
    )
    form = {
        "facility": krmc.pk,
        "app": app.pk,
        "email_domains": "KRMC.example, @krmc-imaging.example",
        "role_claim": "relay_role",
        "role_map": '{"radiologist": "reader", "it-admin": "admin"}',
        "default_role": "viewer",
        "enabled": "on",
    }

    added = admin_client.post("/admin/portal/singlesignon/add/", form)

    assert added.status_code == 302
    sso = SingleSignOn.objects.get()
    assert sso.email_domains == "krmc.example, krmc-imaging.example"
    assert sso.covers("Erin@KRMC.example")
    event = AuditEvent.objects.get(action="sso_change")
    assert event.facility == krmc
    assert event.actor is not None and event.actor.is_staff
    assert event.detail["before"] is None
    assert event.detail["after"] == {
        "provider": PROVIDER_ID,
        "issuer": "https://idp.krmc.example",
        "client_id": "relay-krmc",
        "email_domains": ["krmc.example", "krmc-imaging.example"],
        "role_claim": "relay_role",
        "role_map": {"radiologist": "reader", "it-admin": "admin"},
        "default_role": "viewer",
        "enabled": True,
    }

    # Switched off; then a map to a role Relay does not have is refused.
    changed = admin_client.post(
        f"/admin/portal/singlesignon/{sso.pk}/change/", form | {"enabled": ""}
    )
    assert changed.status_code == 302
    change = AuditEvent.objects.filter(action="sso_change").latest("pk")
    assert (change.detail["before"]["enabled"], change.detail["after"]["enabled"]) == (True, False)
    wrong = admin_client.post(
        f"/admin/portal/singlesignon/{sso.pk}/change/", form | {"role_map": '{"x": "owner"}'}
    )
    assert wrong.status_code == 200
    assert SingleSignOn.objects.get().role_map == {"radiologist": "reader", "it-admin": "admin"}
    assert AuditEvent.objects.filter(action="sso_change").count() == 2
    every_detail = str(list(AuditEvent.objects.values_list("detail", flat=True)))
    assert "the-client-secret-value" not in every_detail


def test_only_staff_reach_the_admin_page(krmc: Facility, alice: User) -> None:
    # A facility admin is not the operator: single sign-on is set up with the facility's IT.
    response = client_for(alice).get("/admin/portal/singlesignon/")
    assert response.status_code in (302, 403, 404)
    assert b"single sign-on" not in response.content.lower()
