"""Account pages (profile, API tokens, invitations) and facility administration (members, audit)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, time

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from .access import AuthedRequest, get_membership_for_user, memberships_of
from .audit import audit_record
from .emails import email_render
from .forms import (
    AcceptInvitationForm,
    ApiTokenForm,
    AuditFilterForm,
    InviteForm,
    LoginForm,
    RoleForm,
)
from .models import ApiToken, AuditAction, AuditEvent, Facility, Invitation, Membership, Role, User
from .services import (
    ServiceError,
    api_token_create,
    api_token_revoke,
    facility_listing_set,
    invitation_accept,
    invitation_create,
    invitation_for_token,
    invitation_withdraw,
    membership_change_role,
    membership_remove,
)
from .tasks import email_send


class LoginView(auth_views.LoginView):
    form_class = LoginForm
    template_name = "registration/login.html"
    redirect_authenticated_user = True


class PasswordChangeView(auth_views.PasswordChangeView):
    success_url = reverse_lazy("password_change_done")

    def form_valid(self, form):  # type: ignore[no-untyped-def]
        response = super().form_valid(form)
        audit_record(action=AuditAction.PASSWORD_CHANGE, request=self.request)
        return response


class PasswordResetView(auth_views.PasswordResetView):
    """Sends the reset link through the same Celery e-mail task as every other e-mail."""

    success_url = reverse_lazy("password_reset_done")

    def form_valid(self, form):  # type: ignore[no-untyped-def]
        form.send_mail = _queue_reset_mail  # type: ignore[method-assign]
        response = super().form_valid(form)
        # The page says the same whether the address is known; the trail records which it was.
        email = form.cleaned_data["email"]
        user = User.objects.filter(email__iexact=email).first()
        audit_record(
            action=AuditAction.PASSWORD_RESET_ASK,
            request=self.request,
            actor=user,
            facility=_home_facility(user),
            detail={"email": email[:254], "known": user is not None},
        )
        return response


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    def form_valid(self, form):  # type: ignore[no-untyped-def]
        response = super().form_valid(form)
        audit_record(
            action=AuditAction.PASSWORD_RESET,
            request=self.request,
            actor=form.user,
            facility=_home_facility(form.user),
        )
        return response


def _home_facility(user: User | None) -> Facility | None:
    """The facility whose admins see this person's account events: their oldest membership."""
    if user is None:
        return None
    membership = memberships_of(user).order_by("created_at", "pk").first()
    return membership.facility if membership is not None else None


def _queue_reset_mail(
    subject_template_name,
    email_template_name,
    context,
    from_email,
    to_email,
    html_email_template_name=None,
):  # type: ignore[no-untyped-def]
    subject, text, html = email_render("password_reset", context)
    email_send.delay(to=to_email, subject=subject, text=text, html=html)


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return redirect("studies" if request.user.is_authenticated else "login")


# --- profile and API tokens ---------------------------------------------------------------------


@require_GET
@login_required
def profile(request: AuthedRequest) -> HttpResponse:
    tokens = ApiToken.objects.filter(user=request.user, revoked_at__isnull=True)
    new_token = request.session.pop("new_api_token", None)
    return render(
        request,
        "portal/profile.html",
        {
            "memberships": memberships_of(request.user),
            "tokens": tokens,
            "form": ApiTokenForm(),
            "new_token": new_token,
        },
    )


@require_POST
@login_required
def token_create(request: AuthedRequest) -> HttpResponse:
    form = ApiTokenForm(request.POST)
    if form.is_valid():
        _, raw = api_token_create(
            user=request.user, name=form.cleaned_data["name"], request=request
        )
        # Shown once, on the next page, then gone: only its hash is stored.
        request.session["new_api_token"] = raw
    else:
        messages.error(request, "Give the token a name.")
    return redirect("profile")


@require_POST
@login_required
def token_revoke(request: AuthedRequest, token_id: int) -> HttpResponse:
    token = ApiToken.objects.filter(pk=token_id, user=request.user).first()
    if token is None:
        raise Http404("No such token.")
    api_token_revoke(token=token, request=request)
    messages.success(request, f"Token '{token.name}' revoked.")
    return redirect("profile")


# --- invitations --------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
def invitation_open(request: HttpRequest, token: str) -> HttpResponse:
    invitation = invitation_for_token(token)
    if invitation is None:
        return render(request, "portal/invitation_invalid.html", status=404)
    existing = User.objects.filter(email__iexact=invitation.email).first()
    if request.user.is_authenticated or existing is not None:
        if not request.user.is_authenticated:
            messages.info(request, f"Sign in as {invitation.email} to accept the invitation.")
            return redirect(f"{reverse_lazy('login')}?next={request.path}")
        if request.method == "POST":
            try:
                membership = invitation_accept(raw_token=token, user=request.user, request=request)
            except ServiceError as exc:
                messages.error(request, str(exc))
                return redirect("studies")
            messages.success(
                request,
                f"You joined {membership.facility.name} as {membership.get_role_display()}.",
            )
            return redirect("studies")
        return render(
            request, "portal/invitation_accept.html", {"invitation": invitation, "form": None}
        )

    form = AcceptInvitationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = User.objects.create_user(
            email=invitation.email,
            password=form.cleaned_data["password1"],
            full_name=form.cleaned_data["full_name"],
        )
        try:
            membership = invitation_accept(raw_token=token, user=user, request=request)
        except ServiceError as exc:
            messages.error(request, str(exc))
            return redirect("login")
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome to Relay. You joined {membership.facility.name}.")
        return redirect("studies")
    return render(
        request, "portal/invitation_accept.html", {"invitation": invitation, "form": form}
    )


# --- facility administration ---------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@login_required
def facility_members(request: AuthedRequest, slug: str) -> HttpResponse:
    membership = get_membership_for_user(request, slug, manage=True)
    facility = membership.facility
    form = InviteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            invitation_create(
                facility=facility,
                email=form.cleaned_data["email"],
                role=form.cleaned_data["role"],
                invited_by=request.user,
                request=request,
            )
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"Invitation sent to {form.cleaned_data['email']}.")
            return redirect("facility_members", slug=slug)
    members = (
        Membership.objects.filter(facility=facility).select_related("user").order_by("user__email")
    )
    invitations = Invitation.objects.filter(
        facility=facility,
        accepted_at__isnull=True,
        revoked_at__isnull=True,
        expires_at__gt=timezone.now(),
    )
    return render(
        request,
        "portal/facility_members.html",
        {
            "facility": facility,
            "members": members,
            "invitations": invitations,
            "form": form,
            "roles": Role.choices,
        },  # type: ignore[attr-defined]
    )


def _get_member_for_admin(request: AuthedRequest, slug: str, member_id: int) -> Membership:
    """A membership of the facility this admin manages; 404 otherwise."""
    admin = get_membership_for_user(request, slug, manage=True)
    member = (
        Membership.objects.filter(pk=member_id, facility=admin.facility)
        .select_related("user")
        .first()
    )
    if member is None:
        raise Http404("No such member.")
    return member


def _member_change(request: AuthedRequest, slug: str, change: Callable[[], str]) -> HttpResponse:
    """Run one change of a membership; its message, or the reason it was refused."""
    try:
        messages.success(request, change())
    except ServiceError as exc:
        messages.error(request, str(exc))
    return redirect("facility_members", slug=slug)


@require_POST
@login_required
def member_role(request: AuthedRequest, slug: str, member_id: int) -> HttpResponse:
    member = _get_member_for_admin(request, slug, member_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose a role.")
        return redirect("facility_members", slug=slug)
    role = form.cleaned_data["role"]

    def change() -> str:
        membership_change_role(membership=member, role=role, by=request.user, request=request)
        return f"{member.user.email} is now {role}."

    return _member_change(request, slug, change)


@require_POST
@login_required
def member_remove(request: AuthedRequest, slug: str, member_id: int) -> HttpResponse:
    member = _get_member_for_admin(request, slug, member_id)

    def change() -> str:
        membership_remove(membership=member, by=request.user, request=request)
        return f"{member.user.email} removed."

    return _member_change(request, slug, change)


@require_POST
@login_required
def facility_listing(request: AuthedRequest, slug: str) -> HttpResponse:
    facility = get_membership_for_user(request, slug, manage=True).facility
    listed = request.POST.get("listed") == "on"
    try:
        facility_listing_set(facility=facility, listed=listed, by=request.user, request=request)
    except ServiceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request, "Listed in the directory." if listed else "Taken out of the directory."
        )
    return redirect("facility_members", slug=slug)


@require_POST
@login_required
def invitation_revoke(request: AuthedRequest, slug: str, invitation_id: int) -> HttpResponse:
    admin = get_membership_for_user(request, slug, manage=True)
    if invitation_withdraw(
        facility=admin.facility, invitation_id=invitation_id, by=request.user, request=request
    ):
        messages.success(request, "Invitation withdrawn.")
    return redirect("facility_members", slug=slug)


@require_GET
@login_required
def facility_audit(request: AuthedRequest, slug: str) -> HttpResponse:
    membership = get_membership_for_user(request, slug, manage=True)
    facility = membership.facility
    form = AuditFilterForm(request.GET or None)
    events = AuditEvent.objects.filter(facility=facility).select_related("actor")
    if form.is_valid():
        data = form.cleaned_data
        if data["action"]:
            events = events.filter(action=data["action"])
        if data["outcome"]:
            events = events.filter(outcome=data["outcome"])
        if data["who"]:
            events = events.filter(actor_email__iexact=data["who"].strip())
        if data["patient_id"]:
            events = events.filter(patient_id=data["patient_id"].strip())
        if data["study_uid"]:
            events = events.filter(study_instance_uid=data["study_uid"].strip())
        tz = timezone.get_current_timezone()
        if data["date_from"]:
            events = events.filter(at__gte=datetime.combine(data["date_from"], time.min, tzinfo=tz))
        if data["date_to"]:
            events = events.filter(at__lte=datetime.combine(data["date_to"], time.max, tzinfo=tz))
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "portal/facility_audit.html",
        {"facility": facility, "form": form, "page": page, "query": query.urlencode()},
    )
