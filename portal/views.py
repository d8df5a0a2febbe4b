"""Account pages (profile, API tokens, invitations) and facility administration (members, audit)."""

from __future__ import annotations

from collections.abc import Callable

from allauth.core.ratelimit import consume
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse, reverse_lazy
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from .access import AuthedRequest, get_membership_for_user, home_facility, memberships_of
from .audit import (
    audit_admin_membership,
    audit_events_for,
    audit_export_stream,
    audit_filters_describe,
    audit_record,
    audit_row,
    audit_search_load,
    audit_search_save,
)
from .context_processors import current_membership_set
from .emails import email_render
from .forms import (
    AcceptInvitationForm,
    ApiTokenForm,
    AuditFilterForm,
    FacilityHelpDeskForm,
    FacilitySecurityForm,
    InviteForm,
    RoleForm,
)
from .lockout import account_unlock, address_blocked, address_failure, locked_emails
from .models import (
    ApiToken,
    AuditAction,
    AuditEvent,
    Facility,
    Invitation,
    Membership,
    Outcome,
    Role,
    User,
)
from .reauth import reauthentication_required
from .services import (
    ServiceError,
    api_token_create,
    api_token_revoke,
    facility_listing_set,
    facility_require_mfa_set,
    invitation_accept,
    invitation_create,
    invitation_for_token,
    invitation_withdraw,
    membership_change_role,
    membership_remove,
)
from .tasks import email_send


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
        email = form.cleaned_data["email"]
        user = User.objects.filter(email__iexact=email).first()
        # At most a few e-mails per address and per account an hour (ACCOUNT_RATE_LIMITS):
        # beyond that a 429, audited, and no e-mail.
        if not consume(self.request, action="reset_password", key=email.lower()):
            audit_record(
                action=AuditAction.PASSWORD_RESET_ASK,
                request=self.request,
                actor=user,
                facility=home_facility(user),
                outcome=Outcome.FAILURE,
                detail={"email": email[:254], "known": user is not None, "reason": "rate limit"},
            )
            return render(self.request, "429.html", status=429)
        form.send_mail = _queue_reset_mail  # type: ignore[method-assign]
        response = super().form_valid(form)
        # The page says the same whether the address is known; the trail records which it was.
        audit_record(
            action=AuditAction.PASSWORD_RESET_ASK,
            request=self.request,
            actor=user,
            facility=home_facility(user),
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
            facility=home_facility(form.user),
        )
        return response


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
def admin_login(request: HttpRequest) -> HttpResponse:
    """The admin site's sign-in is Relay's (second factor included); a signed-in member who is not
    staff gets a plain 404, as for any page that is not theirs."""
    if not request.user.is_authenticated:
        return redirect(f"{reverse('login')}?next={reverse('admin:index')}")
    if not request.user.is_staff:
        raise Http404("No such page.")
    return redirect("admin:index")


@require_POST
@login_required
def facility_switch(request: AuthedRequest) -> HttpResponse:
    """Make another of the user's facilities the current one (the top bar's switcher), then go
    back to the page it was asked from. A facility they are not a member of is refused: 404,
    audited, and the current facility stays."""
    slug = request.POST.get("facility", "")[:50]
    membership = (
        Membership.objects.filter(user=request.user, facility__slug=slug)
        .select_related("facility")
        .first()
    )
    if membership is None:
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            outcome=Outcome.FAILURE,
            detail={"page": "facility switch", "facility": slug, "reason": "not a member"},
        )
        raise Http404("No such facility.")
    current_membership_set(request, membership)
    audit_record(
        action=AuditAction.FACILITY_SWITCH,
        request=request,
        facility=membership.facility,
        detail={"current_facility": slug},
    )
    next_url = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        next_url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        next_url = reverse("home")
    return redirect(next_url)


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
            "tokens": tokens.select_related("facility"),
            "form": ApiTokenForm(user=request.user),
            "new_token": new_token,
        },
    )


@require_POST
@login_required
@reauthentication_required
def token_create(request: AuthedRequest) -> HttpResponse:
    form = ApiTokenForm(request.POST, user=request.user)
    if form.is_valid():
        try:
            _, raw = api_token_create(
                user=request.user,
                name=form.cleaned_data["name"],
                facility=form.cleaned_data["facility"],
                access=form.cleaned_data["access"],
                days=int(form.cleaned_data["days"]),
                request=request,
            )
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            # Shown once, on the next page, then gone: only its hash is stored.
            request.session["new_api_token"] = raw
    else:
        messages.error(request, " ".join(str(e) for errs in form.errors.values() for e in errs))
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
    # Someone trying invitation links from one address is stopped after a few wrong ones.
    if address_blocked(request, "invitation_failed"):
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            outcome=Outcome.FAILURE,
            detail={"reason": "too many wrong invitation links", "what": "invitation"},
        )
        return render(request, "429.html", status=429)
    invitation = invitation_for_token(token)
    if invitation is None:
        address_failure(request, "invitation_failed")
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            outcome=Outcome.FAILURE,
            detail={"reason": "unknown or used invitation link", "what": "invitation"},
        )
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
@reauthentication_required(allow_get=True)
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
            "locked": locked_emails([m.user.email for m in members]),
            "security_form": FacilitySecurityForm(instance=facility),
            "help_desk_form": FacilityHelpDeskForm(instance=facility),
        },  # type: ignore[attr-defined]
    )


@require_POST
@login_required
def member_unlock(request: AuthedRequest, slug: str, member_id: int) -> HttpResponse:
    """Lift a member's sign-in lockout before it runs out (after a call to confirm who it was)."""
    member = _get_member_for_admin(request, slug, member_id)
    account_unlock(user=member.user, request=request)
    messages.success(request, f"{member.user.email} can sign in again.")
    return redirect("facility_members", slug=slug)


@require_POST
@login_required
@reauthentication_required
def facility_security(request: AuthedRequest, slug: str) -> HttpResponse:
    """Whether every member (not only admins) needs a second factor; or, from its own form on
    the same page, the help-desk phone printed on patient handouts."""
    facility = get_membership_for_user(request, slug, manage=True).facility
    if "help_desk_phone" in request.POST:
        return _help_desk_phone_save(request, facility)
    form = FacilitySecurityForm(request.POST)
    if form.is_valid():
        facility_require_mfa_set(
            facility=facility,
            required=form.cleaned_data["require_mfa"],
            by=request.user,
            request=request,
        )
        messages.success(request, "Security settings saved.")
    return redirect("facility_members", slug=slug)


def _help_desk_phone_save(request: AuthedRequest, facility: Facility) -> HttpResponse:
    """Set the facility's help-desk phone, audited with before and after; refused in words."""
    form = FacilityHelpDeskForm(request.POST)
    if not form.is_valid():
        why = " ".join(str(error) for error in form.errors.get("help_desk_phone", []))
        messages.error(request, f"The help-desk phone was not saved. {why}")
        return redirect("facility_members", slug=facility.slug)
    phone = form.cleaned_data["help_desk_phone"]
    with transaction.atomic():
        locked = Facility.objects.select_for_update().get(pk=facility.pk)
        before = locked.help_desk_phone
        if before != phone:
            Facility.objects.filter(pk=facility.pk).update(help_desk_phone=phone)
            audit_record(
                action=AuditAction.FACILITY_CHANGE,
                request=request,
                actor=request.user,
                facility=facility,
                detail={"before": {"help_desk_phone": before}, "after": {"help_desk_phone": phone}},
            )
    messages.success(request, "Help-desk phone saved." if phone else "Help-desk phone removed.")
    return redirect("facility_members", slug=facility.slug)


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
@reauthentication_required
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
@reauthentication_required
def member_remove(request: AuthedRequest, slug: str, member_id: int) -> HttpResponse:
    member = _get_member_for_admin(request, slug, member_id)

    def change() -> str:
        membership_remove(membership=member, by=request.user, request=request)
        return f"{member.user.email} removed."

    return _member_change(request, slug, change)


@require_POST
@login_required
@reauthentication_required
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
@reauthentication_required
def invitation_revoke(request: AuthedRequest, slug: str, invitation_id: int) -> HttpResponse:
    admin = get_membership_for_user(request, slug, manage=True)
    if invitation_withdraw(
        facility=admin.facility, invitation_id=invitation_id, by=request.user, request=request
    ):
        messages.success(request, "Invitation withdrawn.")
    return redirect("facility_members", slug=slug)


@require_http_methods(["GET", "POST"])
@login_required
def facility_audit(request: AuthedRequest, slug: str) -> HttpResponse:
    """The facility's audit log: events about its data and settings, and its people's acts
    elsewhere (a study another facility shared with it), each marked with its side."""
    facility = audit_admin_membership(request, slug, page="audit log").facility
    if request.method == "POST":
        # The filter is posted and kept in the session; the URL carries only its key, so that a
        # patient ID searched for stays out of browser history, server logs and Referer headers.
        form = AuditFilterForm(request.POST)
        if not form.is_valid():
            return render(
                request, "portal/facility_audit.html", {"facility": facility, "form": form}
            )
        values = {name: request.POST.get(name, "") for name in form.fields}
        if not any(values.values()):
            return redirect("facility_audit", slug=slug)
        key = audit_search_save(request, facility, values)
        return redirect(f"{reverse('facility_audit', kwargs={'slug': slug})}?search={key}")
    data: dict[str, str] | None = request.GET or None  # type: ignore[assignment]
    expired = False
    if request.GET.get("search"):
        data = audit_search_load(request, facility, request.GET["search"])
        expired = data is None
    form = AuditFilterForm(data)
    # A filter that does not read shows nothing (and says why), as the export answers 400.
    if not form.is_bound:
        events = audit_events_for(facility, None)
    elif form.is_valid():
        events = audit_events_for(facility, form.cleaned_data)
    else:
        events = AuditEvent.objects.none()
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    rows = [audit_row(event, facility) for event in page]
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "portal/facility_audit.html",
        {
            "facility": facility,
            "form": form,
            "page": page,
            "rows": rows,
            "expired": expired,
            "query": query.urlencode(),
        },
    )


@require_GET
@login_required
def facility_audit_export(
    request: AuthedRequest, slug: str
) -> HttpResponse | StreamingHttpResponse:
    """The log as the page filters it, as CSV or JSON (`?format=json`), streamed a batch at a
    time. The export is itself audited, with its filters."""
    facility = audit_admin_membership(request, slug, page="audit export").facility
    fmt = "json" if request.GET.get("format") == "json" else "csv"
    data: dict[str, str] | None = request.GET or None  # type: ignore[assignment]
    if request.GET.get("search"):
        data = audit_search_load(request, facility, request.GET["search"])
        if data is None:
            # An expired search is not widened silently into the whole trail.
            raise Http404("This search has expired; filter the log again.")
    form = AuditFilterForm(data)
    if data is not None and not form.is_valid():
        # Never a wider export than asked for: a filter that does not read is refused.
        return HttpResponse(
            "The filter is not valid.", status=400, content_type="text/plain; charset=utf-8"
        )
    filters = form.cleaned_data if data is not None else {}
    audit_record(
        action=AuditAction.AUDIT_EXPORT,
        request=request,
        facility=facility,
        patient_id=(filters.get("patient_id") or "").strip(),
        study_instance_uid=(filters.get("study_uid") or "").strip(),
        detail={"format": fmt, "filters": audit_filters_describe(filters)},
    )
    response = StreamingHttpResponse(
        audit_export_stream(audit_events_for(facility, filters), facility, fmt),
        content_type="application/json" if fmt == "json" else "text/csv; charset=utf-8",
    )
    # The file is named for the facility and the day, never for what was searched.
    day = timezone.localdate().strftime("%Y%m%d")
    response["Content-Disposition"] = f'attachment; filename="audit-{facility.slug}-{day}.{fmt}"'
    response["Cache-Control"] = "private, no-store"
    return response


@require_http_methods(["GET", "POST"])
def session_ping(request: HttpRequest) -> HttpResponse:
    """How long this browser session has left: GET asks (and is not counted as activity, so an
    idle tab asking does not keep the session alive), POST is "Stay signed in". JSON; 401 when
    nobody is signed in to the session (SessionTimeoutMiddleware answers for an ended one)."""
    from django.http import JsonResponse
    from django.utils.cache import add_never_cache_headers

    from .middleware import session_clock, session_touch

    if request.method == "POST":
        session_touch(request, force=True)
    clock = session_clock(request)
    response = (
        JsonResponse(
            {"status": "error", "reason": "Not signed in.", "signed_out": True}, status=401
        )
        if clock is None
        else JsonResponse(clock.as_json())
    )
    add_never_cache_headers(response)
    return response
