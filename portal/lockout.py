"""Account lockout after repeated wrong passwords (django-axes), per-address rate limits for the
other doors (django-allauth's rate limiter), and lifting a lockout.

An account is locked after RELAY_LOCKOUT_FAILURES wrong passwords (5) for RELAY_LOCKOUT_MINUTES
(30), whatever address they came from; a facility admin (for their members) or staff lift it
sooner. Each lockout and each unlock is audited under the person's home facility, so that its
admins see it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from allauth.core.internal import ratelimit
from axes.handlers.proxy import AxesProxyHandler
from axes.models import AccessAttempt
from axes.signals import user_locked_out
from axes.utils import reset
from django.conf import settings
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from .access import home_facility
from .audit import audit_record
from .models import AuditAction, Outcome, User


def attempted_username(request: HttpRequest, credentials: dict[str, Any] | None = None) -> str:
    """The account a sign-in names (allauth's form calls the field 'login'; Django's admin and
    authenticate() 'username' or 'email'), normalised so that DOE@x and doe@x are one account."""
    value: Any = None
    if credentials:
        value = credentials.get("email") or credentials.get("username") or credentials.get("login")
    if not value and request is not None and request.method == "POST":
        value = request.POST.get("login") or request.POST.get("username")
    return str(value or "").strip().lower()[:254]


def lockout_response(
    request: HttpRequest,
    original_response: HttpResponse | None = None,
    credentials: dict[str, Any] | None = None,
) -> HttpResponse:
    minutes = int(float(settings.AXES_COOLOFF_TIME) * 60)
    return render(request, "portal/locked_out.html", {"minutes": minutes}, status=429)


@receiver(user_locked_out)
def _on_locked_out(
    sender: Any, request: HttpRequest | None = None, username: str = "", **kwargs: Any
) -> None:
    user = User.objects.filter(email__iexact=username).first() if username else None
    audit_record(
        action=AuditAction.LOCKOUT,
        request=request,
        actor=user,
        facility=home_facility(user),
        outcome=Outcome.FAILURE,
        detail={"email": username[:254], "failures": settings.AXES_FAILURE_LIMIT},
    )


def account_locked(request: HttpRequest, email: str) -> bool:
    """Whether django-axes holds this account locked now (asked outside the password check:
    the second-factor step, a passkey, single sign-on)."""
    AxesProxyHandler.update_request(request)
    return bool(AxesProxyHandler.is_locked(request, credentials={"username": email}))


def account_failure(request: HttpRequest, email: str) -> None:
    """Count a failure toward the account's lockout, as a wrong password counts."""
    AxesProxyHandler.update_request(request)
    AxesProxyHandler.user_login_failed(
        sender=None, credentials={"username": email}, request=request
    )


def locked_emails(emails: list[str]) -> set[str]:
    """Which of these accounts are locked out now."""
    if not emails:
        return set()
    attempts = AccessAttempt.objects.filter(
        username__in=[e.lower() for e in emails],
        failures_since_start__gte=settings.AXES_FAILURE_LIMIT,
    )
    if settings.AXES_COOLOFF_TIME:
        since = timezone.now() - timedelta(hours=float(settings.AXES_COOLOFF_TIME))
        attempts = attempts.filter(attempt_time__gte=since)
    return set(attempts.values_list("username", flat=True))


def account_unlock(*, user: User, request: HttpRequest) -> int:
    """Lift a lockout (and forget the failures counted so far); audited."""
    removed = reset(username=user.email.lower())
    audit_record(
        action=AuditAction.UNLOCK,
        request=request,
        facility=home_facility(user),
        detail={"email": user.email, "attempts_cleared": removed},
    )
    return removed


def address_blocked(request: HttpRequest, action: str) -> bool:
    """True when this address already used up its allowance of failures for `action` (one of
    Relay's entries in ACCOUNT_RATE_LIMITS). Asking does not count."""
    usage = ratelimit.consume(
        request, app="allauth.account", action=action, dry_run=True, limit_get=True
    )
    return usage is None


def address_failure(request: HttpRequest, action: str) -> None:
    """Count one failure from this address for `action`."""
    ratelimit.consume(request, app="allauth.account", action=action, limit_get=True)
