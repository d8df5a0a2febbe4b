"""Who may do what: facility memberships and API-token authentication, in one place."""

from __future__ import annotations

from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.http import Http404, HttpRequest
from django.utils import timezone

from .models import ApiToken, Facility, Membership, User, hash_token


class AuthedRequest(HttpRequest):
    """The request of a view behind login_required (or the API's authentication)."""

    user: User  # type: ignore[assignment]


class TokenRefused(Exception):
    """An API token that does not authenticate; the message says why (never the token)."""


def token_authenticate(raw: str, client_ip: str | None = None) -> ApiToken:
    """The live API token (with its user and facility), or TokenRefused: unknown, revoked,
    expired, or its owner disabled."""
    if not raw.startswith(ApiToken.PREFIX):
        raise TokenRefused("unknown")
    token = (
        ApiToken.objects.filter(token_hash=hash_token(raw))
        .select_related("user", "facility")
        .first()
    )
    if token is None:
        raise TokenRefused("unknown")
    if token.revoked_at is not None:
        raise TokenRefused("revoked")
    if token.expired:
        raise TokenRefused("expired")
    if not token.user.is_active:
        raise TokenRefused("account disabled")
    now = timezone.now()
    # Written at most once a minute per token, so a 3,000-file upload does not update it 3,000 times.
    if (
        token.last_used_at is None
        or (now - token.last_used_at).total_seconds() > 60
        or token.last_used_ip != client_ip
    ):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now, last_used_ip=client_ip)
    return token


def bearer_token(request: HttpRequest) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def memberships_of(user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("facility")


# A person's memberships, oldest first: the first is their home facility.
_OLDEST_FIRST = ("created_at", "pk")


def home_facility(user: User | None) -> Facility | None:
    """The facility that answers for a person when nothing else names one: their oldest
    membership (an invited physician's own practice, a member's first facility). Its admins see
    the person's account events, and it receives what a physician takes under a share."""
    if user is None:
        return None
    membership = memberships_of(user).order_by(*_OLDEST_FIRST).first()
    return membership.facility if membership is not None else None


def acting_facility(user: User | None, facility: Facility | None) -> Facility | None:
    """The facility `user` acts for when touching `facility`'s data: that facility if they are
    a member of it, else their home facility (the recipient's side of a share). One query."""
    if user is None or facility is None:
        return home_facility(user)
    this_one = Case(
        When(facility_id=facility.pk, then=Value(0)), default=Value(1), output_field=IntegerField()
    )
    membership = (
        memberships_of(user)
        .annotate(this_one=this_one)
        .order_by("this_one", *_OLDEST_FIRST)
        .first()
    )
    return membership.facility if membership is not None else None


def facilities_of(user: User) -> QuerySet[Facility]:
    return Facility.objects.filter(memberships__user=user)


def upload_facilities(user: User) -> QuerySet[Facility]:
    return Facility.objects.filter(
        memberships__user=user, memberships__role__in=("admin", "sender")
    )


def get_membership_for_user(
    request: AuthedRequest, slug: str, *, manage: bool = False
) -> Membership:
    """The signed-in user's membership of the facility `slug`; 404 if none (or not an admin
    when `manage` is asked), so that outsiders cannot tell which facilities exist."""
    membership = (
        Membership.objects.filter(user=request.user, facility__slug=slug)
        .select_related("facility")
        .first()
    )
    if membership is None or (manage and not membership.can_manage):
        raise Http404("No such facility.")
    return membership
