"""The study's "Send to PACS" page: push to one of your facility's PACS, see and re-run pushes."""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from portal.access import AuthedRequest, facilities_of
from portal.audit import audit_record
from portal.models import AuditAction

from .access import study_access
from .models import PacsDestination, Push
from .pacs import PushError, push_create, push_rerun


def _uuid(value: str | None) -> UUID:
    """A posted UUID; a malformed one matches nothing rather than raising."""
    try:
        return UUID(str(value))
    except ValueError:
        return UUID(int=0)


@require_http_methods(["GET", "POST"])
@login_required
def study_pacs(request: AuthedRequest, study_uuid: str) -> HttpResponse:
    access = study_access(request, study_uuid)
    destinations = PacsDestination.objects.filter(facility__in=facilities_of(request.user))
    pushes = (
        Push.objects.filter(study=access.study, destination__in=destinations)
        .select_related("destination", "requested_by")
        .prefetch_related("items__instance")
    )
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "push":
            destination = destinations.filter(uuid=_uuid(request.POST.get("destination"))).first()
            if destination is None:
                messages.error(request, "Choose one of your facility's PACS.")
            else:
                try:
                    push_create(
                        access=access, destination=destination, by=request.user, request=request
                    )
                except PushError as exc:
                    messages.error(request, str(exc))
                else:
                    messages.success(request, f"Sending to {destination.name}.")
        elif action == "rerun":
            push = pushes.filter(uuid=_uuid(request.POST.get("push"))).first()
            try:
                again = push is not None and push_rerun(
                    push=push, access=access, by=request.user, request=request
                )
            except PushError as exc:
                messages.error(request, str(exc))
            else:
                if again:
                    messages.success(request, "Sending again what did not arrive.")
                else:
                    messages.error(request, "Nothing to send again.")
        return redirect("study_pacs", study_uuid=access.study.uuid)
    audit_record(
        action=AuditAction.STUDY_VIEW, request=request, study=access.study, detail={"page": "pacs"}
    )
    return render(
        request,
        "transfers/study_pacs.html",
        {
            "study": access.study,
            "access": access,
            "destinations": destinations,
            "pushes": pushes,
        },
    )
