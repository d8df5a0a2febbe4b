"""The sender's "Reconcile patient" page for a study that came on another hospital's disc."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from portal.access import AuthedRequest, upload_facilities
from portal.audit import audit_record
from portal.models import AuditAction

from ..access import study_access
from ..models import Study
from .services import Identity, ReconcileError, study_reconcile_start


class IdentityForm(forms.Form):
    patient_id = forms.CharField(label="Local patient ID (MRN)", max_length=64)
    patient_name = forms.CharField(
        label="Patient name",
        max_length=324,
        help_text="As DICOM writes it: Family^Given^Middle",
    )
    issuer = forms.CharField(label="Issuer of patient ID", max_length=64, required=False)


@require_http_methods(["GET", "POST"])
@login_required
def study_reconcile_view(request: AuthedRequest, study_uuid: str) -> HttpResponse:
    access = study_access(request, study_uuid)
    study = access.study
    # Only the facility that holds the copy rewrites it, and only its senders and admins.
    if (
        not access.is_owner
        or not upload_facilities(request.user).filter(pk=study.facility_id).exists()
    ):
        raise Http404("No such study.")
    issuer_default = study.facility.ae_title or study.facility.slug.upper()
    form = IdentityForm(
        request.POST or None,
        initial={"patient_name": study.patient_name, "issuer": issuer_default},
    )
    if request.method == "POST" and form.is_valid():
        identity = Identity(
            form.cleaned_data["patient_id"],
            form.cleaned_data["patient_name"],
            form.cleaned_data["issuer"],
        )
        try:
            study_reconcile_start(study=study, by=request.user, identity=identity, request=request)
        except ReconcileError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request,
                "Reconciling: the stored copies are being rewritten with the local identity.",
            )
            return redirect("study_detail", study_uuid=study.uuid)
    # Local patients who may be this one: same birth date, or the same name, at this facility.
    likely = Q(patient_name__iexact=study.patient_name)
    if study.patient_birth_date:
        likely |= Q(patient_birth_date=study.patient_birth_date)
    candidates = (
        Study.objects.filter(facility=study.facility, purged_at__isnull=True)
        .exclude(pk=study.pk)
        .exclude(patient_id="")
        .filter(likely)
        .values("patient_id", "patient_name", "issuer_of_patient_id", "patient_birth_date")
        .distinct()
        .order_by("patient_name")[:10]
    )
    audit_record(
        action=AuditAction.STUDY_VIEW, request=request, study=study, detail={"page": "reconcile"}
    )
    return render(
        request,
        "transfers/study_reconcile.html",
        {
            "study": study,
            "form": form,
            "candidates": list(candidates),
            "series_list": study.series.all(),
        },
    )
