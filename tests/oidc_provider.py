"""A real OpenID Connect provider on loopback for the single sign-on tests.

`tests/peers/oidc/provider.mjs` runs node-oidc-provider with one confidential client and a few
accounts. The fixture installs it (`npm ci`, once, from the npm registry), starts it on a free
port, and hands the test an `OidcProvider`: its issuer, the client's credentials, and `login()`,
which plays the person at the provider's sign-in page and returns the redirect back to the client.

A test module takes the fixture (named `oidc_provider`) with
`from tests.oidc_provider import oidc_provider_fixture as oidc_provider_fixture`, and changes the
client or the accounts with indirect parametrization:

    @pytest.mark.parametrize(
        "oidc_provider", [{"redirect_uris": [CALLBACK], "accounts": [...]}], indirect=True
    )
    def test_it_signs_in(oidc_provider: OidcProvider) -> None: ...
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.helpers import require_peer

PEER_DIR = Path(__file__).resolve().parent / "peers" / "oidc"
START_TIMEOUT = 30.0  # seconds until READY; start-up takes well under one here
NPM_TIMEOUT = 600.0

CLIENT_ID = "relay-test"
CLIENT_SECRET = "relay-test-client-secret-not-for-production"
# django-allauth's callback for an openid_connect app with provider_id "test-idp", as the Django
# test client (host "testserver") sees it.
DEFAULT_PROVIDER_ID = "test-idp"
DEFAULT_REDIRECT_URIS = [f"http://testserver/accounts/oidc/{DEFAULT_PROVIDER_ID}/login/callback/"]
# The conftest personas, one newcomer Relay does not know, and an address the provider has not
# verified (which must not be trusted to sign in as anyone).
DEFAULT_ACCOUNTS: list[dict[str, Any]] = [
    {
        "sub": "idp-alice",
        "email": "alice@krmc.example",
        "email_verified": True,
        "name": "Alice Adams",
        "relay_role": "admin",
        "groups": ["krmc"],
    },
    {
        "sub": "idp-bob",
        "email": "bob@krmc.example",
        "email_verified": True,
        "name": "Bob Baker",
        "relay_role": "sender",
        "groups": ["krmc"],
    },
    {
        "sub": "idp-carol",
        "email": "carol@krmc.example",
        "email_verified": True,
        "name": "Carol Clark",
        "relay_role": "reader",
        "groups": ["krmc"],
    },
    {
        "sub": "idp-erin",
        "email": "erin@krmc.example",
        "email_verified": True,
        "name": "Erin Evans",
        "relay_role": "reader",
        "groups": ["krmc"],
    },
    {
        "sub": "idp-unverified",
        "email": "unverified@krmc.example",
        "email_verified": False,
        "name": "Uma Unverified",
        "relay_role": "admin",
        "groups": ["krmc"],
    },
]


class OidcLoginError(AssertionError):
    """The provider did not send the person back to the client."""


class _Forms(HTMLParser):
    """The forms of a page: id -> action."""

    def __init__(self) -> None:
        super().__init__()
        self.actions: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "form":
            values = dict(attrs)
            self.actions[values.get("id") or ""] = values.get("action") or ""


@dataclass
class OidcProvider:
    issuer: str
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    accounts: list[dict[str, Any]]
    token_endpoint_auth_method: str
    stderr_path: Path = field(repr=False)

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def discovery(self) -> dict[str, Any]:
        response = httpx.get(self.discovery_url, timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def allauth_app(self, provider_id: str = DEFAULT_PROVIDER_ID) -> dict[str, Any]:
        """An entry for SOCIALACCOUNT_PROVIDERS["openid_connect"]["APPS"] pointing here."""
        return {
            "provider_id": provider_id,
            "name": "Test identity provider",
            "client_id": self.client_id,
            "secret": self.client_secret,
            "settings": {"server_url": self.issuer},
        }

    def login(self, authorize_url: str, email: str) -> str:
        """Sign in at the provider as `email`, as a fresh browser would, and return the redirect
        back to the client (its redirect_uri with code and state), without following it."""
        return self._drive(authorize_url, "login", {"email": email})

    def refuse(self, authorize_url: str) -> str:
        """Press Cancel on the provider's sign-in page; the redirect carries error=access_denied."""
        return self._drive(authorize_url, "abort", {})

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _on_provider(self, url: str) -> bool:
        here, there = urlsplit(self.issuer), urlsplit(url)
        return (here.scheme, here.netloc) == (there.scheme, there.netloc)

    def _drive(self, authorize_url: str, form_id: str, data: dict[str, str]) -> str:
        if not self._on_provider(authorize_url):
            raise OidcLoginError(f"not an authorization URL of {self.issuer}: {authorize_url}")
        submitted = False
        with httpx.Client(follow_redirects=False, timeout=10) as browser:
            response = browser.get(authorize_url)
            for _ in range(20):
                if response.is_redirect:
                    location = urljoin(str(response.url), response.headers["location"])
                    if not self._on_provider(location):
                        return location
                    response = browser.get(location)
                    continue
                forms = _Forms()
                forms.feed(response.text)
                if response.status_code == 200 and form_id in forms.actions and not submitted:
                    action = urljoin(str(response.url), forms.actions[form_id])
                    response = browser.post(action, data=data)
                    submitted = True
                    continue
                break
        raise OidcLoginError(
            f"the provider answered {response.status_code} at {response.url.path} instead of "
            f"sending the browser back to the client:\n{_text_of(response.text)[:2000]}"
        )


def _text_of(page: str) -> str:
    class _Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []

        def handle_data(self, data: str) -> None:
            if data.strip():
                self.parts.append(data.strip())

    parser = _Text()
    parser.feed(page)
    return " ".join(parser.parts)


def _installed_version() -> str | None:
    manifest = PEER_DIR / "node_modules" / "oidc-provider" / "package.json"
    if not manifest.exists():
        return None
    version: str = json.loads(manifest.read_text())["version"]
    return version


def ensure_installed() -> None:
    """`npm ci` in tests/peers/oidc when node_modules is missing or holds another version."""
    wanted = json.loads((PEER_DIR / "package.json").read_text())["dependencies"]["oidc-provider"]
    if _installed_version() == wanted:
        return
    npm = require_peer("npm")
    with open(Path(tempfile.gettempdir()) / "relay-oidc-peer-npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
        if _installed_version() == wanted:
            return
        started = time.monotonic()
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=PEER_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
        print(f"oidc peer: npm ci took {time.monotonic() - started:.1f}s")
        if result.returncode != 0 or _installed_version() != wanted:
            pytest.fail(
                f"npm ci in {PEER_DIR} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )


def _read_ready_line(process: subprocess.Popen[bytes], timeout: float) -> str | None:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = b""
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return None
            chunk = os.read(process.stdout.fileno(), 1)
            if not chunk:
                return None  # the process closed stdout: it ended
            line += chunk
    finally:
        selector.close()
    return line.decode().strip()


@contextlib.contextmanager
def start_oidc_provider(
    *,
    redirect_uris: list[str] | None = None,
    accounts: list[dict[str, Any]] | None = None,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
    token_endpoint_auth_method: str = "client_secret_post",  # noqa: S107 (a method's name)
) -> Iterator[OidcProvider]:
    """Start provider.mjs on a free loopback port; stop it (SIGTERM, then SIGKILL) on exit."""
    node = require_peer("node")
    ensure_installed()
    redirect_uris = list(redirect_uris or DEFAULT_REDIRECT_URIS)
    accounts = list(accounts or DEFAULT_ACCOUNTS)
    client = {
        "client_id": client_id,
        "client_secret": client_secret,
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": token_endpoint_auth_method,
    }
    env = {
        **os.environ,
        "OIDC_CLIENTS": json.dumps(client),
        "OIDC_ACCOUNTS": json.dumps(accounts),
        "OIDC_EXIT_ON_STDIN_CLOSE": "1",
    }
    with tempfile.TemporaryDirectory(prefix="oidc-peer-") as folder:
        stderr_path = Path(folder) / "stderr.log"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [node, str(PEER_DIR / "provider.mjs"), "0"],
                cwd=PEER_DIR,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            ready = _read_ready_line(process, START_TIMEOUT)
            if not ready or not ready.startswith("READY http://127.0.0.1:"):
                raise RuntimeError(
                    f"the OIDC provider did not start (said {ready!r}):\n"
                    f"{stderr_path.read_text(errors='replace')[-4000:]}"
                )
            yield OidcProvider(
                issuer=ready.split(" ", 1)[1],
                client_id=client_id,
                client_secret=client_secret,
                redirect_uris=redirect_uris,
                accounts=accounts,
                token_endpoint_auth_method=token_endpoint_auth_method,
                stderr_path=stderr_path,
            )
        finally:
            _stop(process)
            # Shown by pytest only when the test fails.
            print("oidc provider stderr:\n" + stderr_path.read_text(errors="replace")[-4000:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


@pytest.fixture(name="oidc_provider")
def oidc_provider_fixture(request: pytest.FixtureRequest) -> Iterator[OidcProvider]:
    """A running provider; indirect parametrization may pass start_oidc_provider's options."""
    options: dict[str, Any] = getattr(request, "param", None) or {}
    with start_oidc_provider(**options) as provider:
        yield provider
