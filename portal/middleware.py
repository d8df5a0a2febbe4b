"""Ending sessions: after a while without activity, and at an absolute limit after sign-in.

A signed-in session ends after RELAY_SESSION_IDLE_MINUTES (15) without a request, or
RELAY_SESSION_MAX_HOURS (12) after sign-in however active it was (RELAY_SESSION_IDLE_SECONDS,
when set, overrides the minutes: tests and demonstrations use a few seconds). A patient link's
verified browser session has the same two limits. The times live in the session itself; a request
authenticated by an API token has no session and is left alone.

Every request is checked; only the write of "last active" is spared to once every
`_touch_every()` seconds, so a page that loads forty frames writes the session once. The session's
status (GET of `session_ping`) is the one request that does not count as activity: every open tab
asks it before warning, so that an idle tab does not sign out a person busy in another one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.contrib.auth.signals import user_logged_in
from django.contrib.auth.views import redirect_to_login
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import resolve_url
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.html import format_html

from .audit import audit_record
from .models import AuditAction, Outcome, User

# When this session signed in (or verified a patient link), when it was last active, and for
# whom: a different user in the same session (or a patient session becoming a sign-in) starts
# the clock again. Seconds since the epoch, as floats.
SIGNED_IN_AT = "relay_signed_in_at"
ACTIVE_AT = "relay_active_at"
SESSION_FOR = "relay_session_for"
# transfers.access.PATIENT_SESSION_KEY (portal does not import transfers; a test holds the two
# names together).
PATIENT_SESSION_KEY = "patient_shares"
_PATIENT = "patient"

# The session's status (portal.views.session_ping): its GET is not activity.
STATUS_URL_NAME = "session_ping"

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")

IDLE = "idle"
ABSOLUTE = "absolute"


def idle_seconds() -> int:
    seconds = getattr(settings, "RELAY_SESSION_IDLE_SECONDS", None)
    if seconds:
        return max(int(seconds), 1)
    return max(int(float(getattr(settings, "RELAY_SESSION_IDLE_MINUTES", 15)) * 60), 1)


def max_seconds() -> int:
    return max(int(float(getattr(settings, "RELAY_SESSION_MAX_HOURS", 12)) * 3600), 1)


def warn_seconds() -> int:
    """How long before the end the page shows its warning."""
    return max(int(getattr(settings, "RELAY_SESSION_WARN_SECONDS", 120)), 1)


def _touch_every() -> float:
    # At most every 30 s; a short idle limit (tests) needs a finer grain, or the session would
    # end up to 30 s before it should.
    return min(30.0, idle_seconds() / 20)


def _now() -> float:
    return timezone.now().timestamp()


def _duration(seconds: int) -> str:
    """'15 minutes', '12 hours', '8 seconds'."""
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} second{'' if seconds == 1 else 's'}"


def expiry_message(reason: str) -> str:
    if reason == ABSOLUTE:
        return f"Signed out: a session lasts at most {_duration(max_seconds())}. Sign in again."
    return f"Signed out after {_duration(idle_seconds())} without activity."


def _holder(request: HttpRequest) -> str | None:
    """Whose session this is, for the clock: the signed-in user's id, "patient" for a verified
    patient link, or None for a session nobody signed in to (nothing to time out)."""
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return str(user.pk)
    session = getattr(request, "session", None)
    if session is not None and session.get(PATIENT_SESSION_KEY):
        return _PATIENT
    return None


@dataclass(frozen=True)
class SessionClock:
    """How long a session has left, for the page's warning and the status ping."""

    idle_seconds: int
    max_seconds: int
    warn_seconds: int
    idle_left: float
    absolute_left: float

    @property
    def left(self) -> float:
        return max(min(self.idle_left, self.absolute_left), 0.0)

    @property
    def left_seconds(self) -> int:
        return int(self.left)

    @property
    def max_label(self) -> str:
        return _duration(self.max_seconds)

    @property
    def ends_by(self) -> str:
        """Which limit comes first: "idle" (Stay signed in helps) or "absolute" (it does not)."""
        return ABSOLUTE if self.absolute_left < self.idle_left else IDLE

    def as_json(self) -> dict[str, Any]:
        return {
            "left": round(self.left, 1),
            "ends_by": self.ends_by,
            "idle_seconds": self.idle_seconds,
            "warn_seconds": self.warn_seconds,
        }


def session_clock(request: HttpRequest) -> SessionClock | None:
    """This session's clock, or None when nobody is signed in to it."""
    if _holder(request) is None or request.session.get(SIGNED_IN_AT) is None:
        return None
    now = _now()
    idle, longest = idle_seconds(), max_seconds()
    active = float(request.session.get(ACTIVE_AT, now))
    started = float(request.session[SIGNED_IN_AT])
    return SessionClock(
        idle_seconds=idle,
        max_seconds=longest,
        warn_seconds=warn_seconds(),
        idle_left=active + idle - now,
        absolute_left=started + longest - now,
    )


def session_touch(request: HttpRequest, *, force: bool = False) -> None:
    """Count this request as activity. Written at most every few seconds unless `force`
    ("Stay signed in" must move the clock even right after a page load)."""
    holder = _holder(request)
    if holder is None:
        return
    session = request.session
    now = _now()
    if session.get(SESSION_FOR) != holder or session.get(SIGNED_IN_AT) is None:
        # First sight of this sign-in (the user_logged_in receiver usually got there first).
        session[SESSION_FOR] = holder
        session[SIGNED_IN_AT] = now
        session[ACTIVE_AT] = now
        return
    if force or now - float(session.get(ACTIVE_AT, 0)) >= _touch_every():
        session[ACTIVE_AT] = now


def _expired(request: HttpRequest, holder: str) -> str | None:
    """ "idle" or "absolute" when this session is over, else None."""
    session = request.session
    if session.get(SESSION_FOR) != holder or session.get(SIGNED_IN_AT) is None:
        return None  # a sign-in not seen before: its clock starts now
    now = _now()
    idle_end = float(session.get(ACTIVE_AT, session[SIGNED_IN_AT])) + idle_seconds()
    absolute_end = float(session[SIGNED_IN_AT]) + max_seconds()
    if now <= min(idle_end, absolute_end):
        return None
    # Whichever limit was reached first is the reason.
    return ABSOLUTE if absolute_end < idle_end else IDLE


def _is_navigation(request: HttpRequest) -> bool:
    """A person's browser loading a page (not fetch(), a frame, an image or a script)."""
    headers = request.headers
    if headers.get("Sec-Fetch-Dest", "document") != "document":
        return False
    if headers.get("Sec-Fetch-Mode", "navigate") != "navigate":
        return False
    if headers.get("X-Requested-With") or headers.get("HX-Request"):
        return False
    if request.method not in ("GET", "HEAD") and request.content_type not in _FORM_TYPES:
        return False  # a file or JSON sent by a script, not a form
    accept = headers.get("Accept", "")
    return not ("application/json" in accept and "text/html" not in accept)


def _url_path(name: str) -> str | None:
    try:
        return reverse(name)
    except NoReverseMatch:
        return None


def _passes_through(request: HttpRequest) -> bool:
    """Requests that go on, as anonymous, once the session is ended: the sign-in and sign-out
    pages themselves (a 401 for pressing "Sign out" would be absurd), and a request that carries
    an API token (the token, not the ended session, decides)."""
    if request.headers.get("Authorization"):
        return True
    login_path = resolve_url(settings.LOGIN_URL)
    return request.path in {login_path, _url_path("logout")}


class SessionTimeoutMiddleware:
    """Ends idle and over-long sessions. Goes after MessageMiddleware (the sign-in page says why)
    and before the second-factor middleware (an ended session owes nothing)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        holder = _holder(request)
        if holder is not None:
            reason = _expired(request, holder)
            if reason is not None:
                ended = self._end(request, holder, reason)
                if ended is not None:
                    return ended
        return self.get_response(request)

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: Any,
        view_kwargs: Any,
    ) -> None:
        # Here rather than in __call__: only here is it known which view answers.
        match = request.resolver_match
        status_only = (
            request.method in ("GET", "HEAD")
            and match is not None
            and match.url_name == STATUS_URL_NAME
        )
        if not status_only:
            session_touch(request)
        # For the page's warning (templates/base.html puts it on <body>).
        request.session_clock = session_clock(request)  # type: ignore[attr-defined]

    def _end(self, request: HttpRequest, holder: str, reason: str) -> HttpResponse | None:
        session = request.session
        if holder == _PATIENT:
            # Portal does not know shares; their ids (no PHI, no token) let the operator find them.
            shares = session.get(PATIENT_SESSION_KEY, [])
            audit_record(
                action=AuditAction.SESSION_EXPIRED,
                request=request,
                outcome=Outcome.SUCCESS,
                detail={"reason": reason, "via": "patient link", "share_ids": list(shares)},
            )
            # What the patient's "Sign out" does: a new, empty session.
            session.flush()
        else:
            user: User = request.user  # type: ignore[assignment]
            audit_record(
                action=AuditAction.SESSION_EXPIRED,
                request=request,
                actor=user,
                detail={"reason": reason},
            )
            logout(request)
        message = expiry_message(reason)
        messages.info(request, message, fail_silently=True)
        if _passes_through(request):
            return None
        navigation = _is_navigation(request)
        if navigation and request.method in ("GET", "HEAD"):
            if holder == _PATIENT:
                return None  # the patient pages send an unverified browser to the factor page
            # The path only: a query string can hold what someone searched for (a patient name).
            return redirect_to_login(request.path, resolve_url(settings.LOGIN_URL))
        return _unauthorized(request, message, navigation=navigation, patient=holder == _PATIENT)


def _unauthorized(
    request: HttpRequest, message: str, *, navigation: bool, patient: bool
) -> HttpResponse:
    if navigation:
        # A form sent after the session ended: say so, with the way back in.
        target = request.path if patient else _login_url(request.path)
        body = format_html('<p>{} <a href="{}">Sign in again</a>.</p>', message, target)
        return HttpResponse(body, status=401, content_type="text/html; charset=utf-8")
    return JsonResponse(
        {"status": "error", "reason": message, "signed_out": True},
        status=401,
    )


def _login_url(path: str) -> str:
    response = redirect_to_login(path, resolve_url(settings.LOGIN_URL))
    return str(response["Location"])


@receiver(user_logged_in)
def _on_login(sender: Any, request: HttpRequest | None, user: User, **kwargs: Any) -> None:
    # The absolute limit counts from the sign-in itself, also when the same person signs in again
    # in a session that already had a clock.
    if request is None or not hasattr(request, "session"):
        return
    now = _now()
    request.session[SESSION_FOR] = str(user.pk)
    request.session[SIGNED_IN_AT] = now
    request.session[ACTIVE_AT] = now
