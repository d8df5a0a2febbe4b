"""The OpenID Connect provider peer itself, driven with plain httpx as a relying party would:
discovery, the authorization-code flow with PKCE, a signed ID token, and the refusals the
single sign-on tests count on."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest

from tests.oidc_provider import OidcLoginError, OidcProvider, start_oidc_provider
from tests.oidc_provider import oidc_provider_fixture as oidc_provider_fixture  # the fixture

pytestmark = pytest.mark.peer

CALLBACK = "http://testserver/accounts/oidc/test-idp/login/callback/"


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcProvider]:
    """One provider with the default client and accounts for the tests that change neither
    (each sign-in starts from a fresh browser); `oidc_provider` gives a test its own."""
    with start_oidc_provider() as provider:
        yield provider


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _authorize_url(
    provider: OidcProvider, *, state: str, nonce: str, challenge: str, redirect_uri: str = CALLBACK
) -> str:
    endpoint = provider.discovery()["authorization_endpoint"]
    query = {
        "response_type": "code",
        "client_id": provider.client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid profile email",
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return f"{endpoint}?{urlencode(query)}"


def _sign_in(provider: OidcProvider, email: str) -> tuple[dict[str, list[str]], str, str]:
    """The callback's query, the PKCE verifier and the nonce of one sign-in."""
    verifier, challenge = _pkce()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    callback = provider.login(
        _authorize_url(provider, state=state, nonce=nonce, challenge=challenge), email
    )
    assert callback.split("?")[0] == CALLBACK
    query = parse_qs(urlsplit(callback).query)
    assert query["state"] == [state]
    assert query["iss"] == [provider.issuer]
    assert "error" not in query
    return query, verifier, nonce


def _exchange(provider: OidcProvider, code: str, verifier: str, **overrides: Any) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK,
        "code_verifier": verifier,
    }
    auth: tuple[str, str] | None = None
    secret = overrides.pop("client_secret", provider.client_secret)
    if provider.token_endpoint_auth_method == "client_secret_basic":
        auth = (provider.client_id, secret)
    else:
        data |= {"client_id": provider.client_id, "client_secret": secret}
    data |= overrides
    return httpx.post(provider.discovery()["token_endpoint"], data=data, auth=auth, timeout=10)


def _verified_id_token(provider: OidcProvider, id_token: str) -> dict[str, Any]:
    jwks = httpx.get(provider.discovery()["jwks_uri"], timeout=10).json()
    kid = jwt.get_unverified_header(id_token)["kid"]
    key = next(k for k in jwks["keys"] if k["kid"] == kid)
    assert "d" not in key  # the public half only
    claims: dict[str, Any] = jwt.decode(
        id_token,
        key=jwt.PyJWK(key).key,
        algorithms=["RS256"],
        audience=provider.client_id,
        issuer=provider.issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )
    return claims


def test_it_publishes_its_discovery_document(idp: OidcProvider) -> None:
    document = httpx.get(idp.discovery_url, timeout=10).json()

    assert document["issuer"] == idp.issuer
    assert idp.issuer.startswith("http://127.0.0.1:")
    for endpoint in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri"):
        assert document[endpoint].startswith(idp.issuer + "/")
    assert {"openid", "email", "profile"} <= set(document["scopes_supported"])
    assert "RS256" in document["id_token_signing_alg_values_supported"]
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert {"client_secret_basic", "client_secret_post"} <= set(
        document["token_endpoint_auth_methods_supported"]
    )
    assert {"email", "email_verified", "relay_role", "groups"} <= set(document["claims_supported"])


@pytest.mark.parametrize(
    "oidc_provider",
    [
        {"token_endpoint_auth_method": "client_secret_post"},
        {"token_endpoint_auth_method": "client_secret_basic"},
    ],
    indirect=True,
    ids=["client_secret_post", "client_secret_basic"],
)
def test_it_signs_in_with_the_code_flow_and_pkce(oidc_provider: OidcProvider) -> None:
    query, verifier, nonce = _sign_in(oidc_provider, "alice@krmc.example")

    response = _exchange(oidc_provider, query["code"][0], verifier)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"].lower() == "bearer"
    claims = _verified_id_token(oidc_provider, tokens["id_token"])
    assert claims["sub"] == "idp-alice"
    assert claims["nonce"] == nonce
    assert claims["email"] == "alice@krmc.example"
    assert claims["email_verified"] is True
    assert claims["relay_role"] == "admin"
    assert claims["groups"] == ["krmc"]

    # django-allauth reads the claims from the userinfo endpoint first.
    userinfo = httpx.get(
        oidc_provider.discovery()["userinfo_endpoint"],
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=10,
    ).json()
    assert userinfo["sub"] == "idp-alice"
    assert userinfo["email"] == "alice@krmc.example"
    assert userinfo["relay_role"] == "admin"


def test_it_says_when_the_address_is_not_verified(idp: OidcProvider) -> None:
    query, verifier, _ = _sign_in(idp, "unverified@krmc.example")

    tokens = _exchange(idp, query["code"][0], verifier).json()
    claims = _verified_id_token(idp, tokens["id_token"])
    assert claims["email"] == "unverified@krmc.example"
    assert claims["email_verified"] is False


def test_it_refuses_a_wrong_code_verifier(idp: OidcProvider) -> None:
    query, _, _ = _sign_in(idp, "bob@krmc.example")

    response = _exchange(idp, query["code"][0], _pkce()[0])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_it_refuses_a_wrong_client_secret(idp: OidcProvider) -> None:
    query, verifier, _ = _sign_in(idp, "bob@krmc.example")

    response = _exchange(idp, query["code"][0], verifier, client_secret="not-it")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_it_takes_a_code_only_once(idp: OidcProvider) -> None:
    query, verifier, _ = _sign_in(idp, "carol@krmc.example")

    assert _exchange(idp, query["code"][0], verifier).status_code == 200
    again = _exchange(idp, query["code"][0], verifier)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"


def test_it_refuses_an_unknown_redirect_uri(idp: OidcProvider) -> None:
    elsewhere = "http://attacker.invalid/accounts/oidc/test-idp/login/callback/"
    verifier, challenge = _pkce()
    url = _authorize_url(idp, state="s", nonce="n", challenge=challenge, redirect_uri=elsewhere)

    response = httpx.get(url, follow_redirects=False, timeout=10)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert '<span class="error">invalid_redirect_uri</span>' in response.text
    with pytest.raises(OidcLoginError, match="redirect_uri"):
        idp.login(url, "alice@krmc.example")


def test_it_refuses_an_unknown_address(idp: OidcProvider) -> None:
    verifier, challenge = _pkce()
    url = _authorize_url(idp, state="s", nonce="n", challenge=challenge)

    with pytest.raises(OidcLoginError, match="No account with this e-mail address"):
        idp.login(url, "mallory@elsewhere.example")


def test_it_sends_access_denied_when_the_person_cancels(idp: OidcProvider) -> None:
    verifier, challenge = _pkce()
    url = _authorize_url(idp, state="s1", nonce="n", challenge=challenge)

    callback = idp.refuse(url)
    assert callback.split("?")[0] == CALLBACK
    query = parse_qs(urlsplit(callback).query)
    assert query["error"] == ["access_denied"]
    assert query["state"] == ["s1"]
    assert "code" not in query


@pytest.mark.parametrize(
    "oidc_provider",
    [
        {
            "client_id": "other-client",
            "redirect_uris": ["http://relay.test/cb/"],
            "accounts": [
                {
                    "sub": "x-1",
                    "email": "dana@gfc.example",
                    "email_verified": True,
                    "relay_role": "reader",
                    "relay_facility": "gfc",
                }
            ],
        }
    ],
    indirect=True,
)
def test_it_takes_the_client_and_accounts_it_is_given(oidc_provider: OidcProvider) -> None:
    endpoint = oidc_provider.discovery()["authorization_endpoint"]
    query = {
        "response_type": "code",
        "client_id": "other-client",
        "redirect_uri": "http://relay.test/cb/",
        "scope": "openid email profile",
        "state": "st",
    }
    callback = oidc_provider.login(f"{endpoint}?{urlencode(query)}", "DANA@gfc.example")
    code = parse_qs(urlsplit(callback).query)["code"][0]

    response = httpx.post(
        oidc_provider.discovery()["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": "http://relay.test/cb/",
            "client_id": "other-client",
            "client_secret": oidc_provider.client_secret,
        },
        timeout=10,
    )
    claims = _verified_id_token(oidc_provider, response.json()["id_token"])
    assert claims["sub"] == "x-1"
    assert claims["relay_facility"] == "gfc"
    assert "name" not in claims
