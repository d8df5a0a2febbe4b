"""Who may do what: facility memberships and API-token authentication, in one place."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404, HttpRequest
from django.utils import timezone

from .models import ApiToken, Facility, Membership, User, hash_token


class AuthedRequest(HttpRequest):
    """The request of a view behind login_required (or the API's authentication)."""

    user: User  # type: ignore[assignment]


def user_from_token(raw: str) -> User | None:
    """The active user an API token belongs to, or None (unknown, revoked, user disabled)."""
    if not raw.startswith(ApiToken.PREFIX):
        return None
    token = (
        ApiToken.objects.filter(
            token_hash=hash_token(raw), revoked_at__isnull=True, user__is_active=True
        )
        .select_related("user")
        .first()
    )
    if token is None:
        return None
    now = timezone.now()
    # Written at most once a minute per token, so a 3,000-file upload does not update it 3,000 times.
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user


def bearer_token(request: HttpRequest) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def memberships_of(user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("facility")


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
