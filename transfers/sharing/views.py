"""Pages of sharing: the share form, the Inbox, the Sent page with receipts, revoke and extend."""

from __future__ import annotations

import uuid
from datetime import datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.files.uploadedfile import UploadedFile
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal.access import AuthedRequest, upload_facilities
from portal.audit import audit_record
from portal.models import AuditAction, Facility

from ..deidentify.services import (
    DeidentifyError,
    burned_in_series,
    copies_of_share,
    deidentified_copies_attach,
    deidentified_copies_prepare,
)
from ..models import (
    ORIGINALS,
    DeidentifiedCopy,
    PacsDestination,
    SecondFactor,
    Share,
    ShareKind,
    Study,
)
from ..queue import task_queue_on_commit
from ..reports import ReportError, report_attach
from .directory import facility_directory
from .message import share_message_check
from .services import (
    ShareError,
    patient_link_email,
    share_create,
    share_extend,
    share_open,
    share_revoke,
)

# Who a share goes to, as the sender is asked first; each kind then shows only its own fields.
RECIPIENT_KINDS = [
    (ShareKind.FACILITY, "A facility"),
    (ShareKind.PHYSICIAN, "A physician or colleague (by e-mail)"),
    (ShareKind.PATIENT, "The patient"),
]
KIND_FIELDS: dict[str, list[str]] = {
    ShareKind.FACILITY: ["recipient_facility"],
    ShareKind.PHYSICIAN: ["recipient_email"],
    ShareKind.PATIENT: ["recipient_email", "second_factor", "pin"],
}
# A ShareError from share_create is shown beside the field it is about, found by its wording
# (tests/transfers/sharing/test_share_form.py holds each one to its field); the rest go on top.
ERROR_FIELDS = [
    ("Choose the facility", "recipient_facility"),
    ("already see the facility", "recipient_facility"),
    ("not a valid e-mail", "recipient_email"),
    ("second factor", "second_factor"),  # before "PIN": "...second factor: birth date or PIN."
    ("PIN", "pin"),
    ("expiry", "expires_on"),
    ("allows shares of at most", "expires_on"),
    ("at least one thing", "can_view"),
    ("must not identify the patient", "message"),
]


class FacilitySelect(forms.Select):
    """The recipient facility menu; each option says whether that facility has a PACS
    (data-has-pacs), which static/js/share_form.js follows to set the import right."""

    def __init__(self, *args: Any, with_pacs: set[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.with_pacs = with_pacs or set()

    def create_option(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        option = super().create_option(*args, **kwargs)
        pk = getattr(option["value"], "value", option["value"])
        if pk not in (None, ""):
            option["attrs"]["data-has-pacs"] = "true" if pk in self.with_pacs else "false"
        return option


class ShareForm(forms.Form):
    kind = forms.ChoiceField(choices=ShareKind.choices, widget=forms.HiddenInput)
    recipient_facility = forms.ModelChoiceField(
        queryset=Facility.objects.none(),
        required=False,
        label="Facility",
        empty_label="Choose a facility…",
        error_messages={"invalid_choice": "Choose a facility from the list."},
        help_text="All its members see the studies in their Inbox.",
    )
    recipient_email = forms.EmailField(required=False, label="E-mail")
    message = forms.CharField(
        required=False,
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text=(
            "This message is e-mailed to the recipient. Do not include the patient's name, "
            "ID or birth date."
        ),
    )
    expires_on = forms.DateField(
        widget=forms.DateInput(attrs={"type": "date"}), label="Available until"
    )
    can_view = forms.BooleanField(required=False, initial=True, label="View")
    can_download = forms.BooleanField(required=False, initial=True, label="Download")
    can_import = forms.BooleanField(required=False, label="Import to their PACS")
    second_factor = forms.ChoiceField(
        # A patient answers their birth date or a PIN; the e-mailed code is a guest link's.
        choices=[
            ("", "Choose…"),
            *(
                (value, label)
                for value, label in SecondFactor.choices
                if value != SecondFactor.EMAIL_CODE
            ),
        ],
        required=False,
        label="Second factor",
        help_text="What the patient enters, besides the link, to open it.",
    )
    pin = forms.CharField(
        required=False,
        max_length=12,
        label="PIN",
        help_text="6 to 12 digits, not the birth date; only with the PIN second factor.",
    )
    report_text = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 4}), label="Report (typed)"
    )
    report_pdf = forms.FileField(required=False, label="or report (PDF)")
    # De-identified sharing (transfers.deidentify): a copy without the patient's identity.
    deidentify = forms.BooleanField(
        required=False,
        label="Share a de-identified copy",
        help_text=(
            "The recipient gets a copy made by the DICOM Basic Confidentiality Profile "
            "(PS3.15): no name, ID, birth date, accession number, institution or people's "
            "names; new UIDs; private data removed. The original stays here, and only your "
            "facility knows which study the copy came from."
        ),
    )
    retain_dates = forms.BooleanField(
        required=False,
        label="Keep dates, moved by a secret offset",
        help_text="Every date moves by the same number of days, so intervals stay true.",
    )
    clean_descriptors = forms.BooleanField(
        required=False,
        label="Keep descriptions, cleaned",
        help_text="Study and series descriptions, protocol names and the like are kept, with "
        "the patient's names and numbers taken out; without it they are removed.",
    )
    retain_device = forms.BooleanField(
        required=False,
        label="Keep the device's identity",
        help_text="Scanner serial number, station name and the like (for QA or research).",
    )
    burned_in_confirmed = forms.BooleanField(
        required=False,
        label="I have checked these series: their pixels show nothing that identifies the patient",
    )

    def __init__(
        self, *args: object, facility: Facility, kind: str | None = None, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        directory = facility_directory(for_facility=facility)
        with_pacs = set(
            directory.filter(
                Q(has_pacs=True) | Exists(PacsDestination.objects.filter(facility=OuterRef("pk")))
            ).values_list("pk", flat=True)
        )
        field = self.fields["recipient_facility"]
        field.widget = FacilitySelect(with_pacs=with_pacs)
        field.queryset = directory  # type: ignore[attr-defined]  # sets the menu's options
        self.fields["kind"].initial = kind
        self.fields["expires_on"].initial = timezone.localdate() + timedelta(
            days=facility.share_default_days
        )
        # A facility "has a PACS" when it says so or Relay has a destination for it. With
        # JavaScript the import right follows the chosen facility; without it, the right is on
        # when any facility of the directory has a PACS, since it is harmless where there is
        # none (nothing to import into) and wanted where there is one.
        if kind == ShareKind.FACILITY:
            self.fields["can_import"].initial = bool(with_pacs)
            self.fields["can_import"].help_text = "On by default for a facility with a PACS."
        elif kind == ShareKind.PATIENT:
            self.fields["recipient_email"].label = "The patient's e-mail (optional)"
            self.fields[
                "recipient_email"
            ].help_text = "The link is e-mailed here; you can also print it for the patient."
        else:
            self.fields["recipient_email"].help_text = (
                "One e-mail with a link. Without a Relay account they open it as a guest, with a "
                "one-time code e-mailed to this address: no password, no sign-up."
            )

    def add_share_error(self, error: ShareError) -> None:
        """The refusal beside its field (ERROR_FIELDS), or at the top."""
        text = str(error)
        field = next((name for words, name in ERROR_FIELDS if words in text), None)
        self.add_error(field, text)

    def describe_fields(self) -> None:
        """Tie each control to its help and error lines for screen readers."""
        for name, field in self.fields.items():
            ids = [f"{name}-help"] if field.help_text else []
            if name in self.errors:
                ids.append(f"{name}-error")
                field.widget.attrs["aria-invalid"] = "true"
            if ids:
                field.widget.attrs["aria-describedby"] = " ".join(ids)


def _expiry(day: object) -> datetime:
    """The end of the chosen day in the portal's time zone."""
    return datetime.combine(day, time(23, 59), tzinfo=timezone.get_current_timezone())  # type: ignore[arg-type]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@require_http_methods(["GET", "POST"])
@login_required
def share_new(request: AuthedRequest) -> HttpResponse:
    uuids = request.GET.getlist("study") or request.POST.getlist("study")
    if not all(_is_uuid(value) for value in uuids):
        raise Http404("No such study among those you may share.")
    facilities = upload_facilities(request.user)
    studies = list(
        Study.objects.filter(
            ORIGINALS, uuid__in=uuids[:100], facility__in=facilities, purged_at__isnull=True
        ).select_related("facility")
    )
    if not studies or len(studies) != len(set(uuids)):
        raise Http404("No such study among those you may share.")
    facility = studies[0].facility
    # The kind of recipient is chosen first (?to=, links that work without JavaScript), then
    # travels in the form's hidden "kind" field.
    kinds = {str(value) for value, _ in RECIPIENT_KINDS}
    chosen = request.POST.get("kind") if request.method == "POST" else request.GET.get("to")
    kind = chosen if chosen in kinds else None
    form = ShareForm(request.POST or None, request.FILES or None, facility=facility, kind=kind)
    burned_in: list[Any] = []
    if request.method == "POST" and form.is_valid() and form.cleaned_data["deidentify"]:
        burned_in = _deidentify_check(form, studies)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            share_message_check(message=data["message"], studies=studies)
            with transaction.atomic():
                shared = studies
                if data["deidentify"]:
                    options = frozenset(
                        o for o in ("retain_dates", "clean_descriptors", "retain_device") if data[o]
                    )
                    shared = deidentified_copies_prepare(
                        studies=studies,
                        by=request.user,
                        options=options,
                        burned_in_confirmed=burned_in,
                        request=request,
                    )
                share, raw_token = share_create(
                    facility=facility,
                    created_by=request.user,
                    studies=shared,
                    kind=data["kind"],
                    recipient_facility=data["recipient_facility"],
                    recipient_email=data["recipient_email"] or "",
                    message=data["message"],
                    expires_at=_expiry(data["expires_on"]),
                    can_view=data["can_view"],
                    can_download=data["can_download"],
                    can_import=data["can_import"],
                    second_factor=data["second_factor"],
                    pin=data["pin"],
                    request=request,
                )
                if data["deidentify"]:
                    deidentified_copies_attach(share=share, copies=shared)
        except DeidentifyError as exc:
            form.add_error("deidentify", str(exc))
        except ShareError as exc:
            form.add_share_error(exc)
        else:
            if data["report_text"] or data["report_pdf"]:
                _attach_reports(request, share, studies, data["report_text"], data["report_pdf"])
            if raw_token:
                # Shown once, on the handout page (and e-mailed if an address was given);
                # only the hash is kept.
                patient_link_email(share=share, raw_token=raw_token)
                request.session[f"patient_link_{share.uuid}"] = raw_token
                return redirect("patient_handout", share_uuid=share.uuid)
            messages.success(request, f"Shared with {share.recipient_label}.")
            return redirect("share_detail", share_uuid=share.uuid)
    audit_record(
        action=AuditAction.STUDY_LIST,
        request=request,
        facility=facility,
        detail={"page": "share_new", "studies": [str(study.uuid) for study in studies]},
    )
    form.describe_fields()
    studies_query = urlencode([("study", str(study.uuid)) for study in studies])
    return render(
        request,
        "transfers/share_new.html",
        {
            "form": form,
            "studies": studies,
            "facility": facility,
            "kind": kind,
            "kinds": [
                (value, label, f"?{studies_query}&to={value}") for value, label in RECIPIENT_KINDS
            ],
            "recipient_fields": [form[name] for name in KIND_FIELDS.get(kind or "", [])],
            "burned_in": burned_in,
        },
    )


def _deidentify_check(form: ShareForm, studies: list[Study]) -> list[Any]:
    """The refusals of a de-identified share, on the form; the burned-in series it names."""
    data = form.cleaned_data
    if data["kind"] == ShareKind.PATIENT:
        form.add_error(
            None,
            "A patient link carries the patient's own images: it cannot be de-identified. "
            "Share a de-identified copy with a facility or a physician.",
        )
        return []
    if data["report_text"] or data["report_pdf"]:
        form.add_error(
            "deidentify", "A report names the patient: it cannot go with a de-identified copy."
        )
    burned_in = burned_in_series(studies=studies)
    if burned_in and not data["burned_in_confirmed"]:
        form.add_error(
            "burned_in_confirmed",
            "These series may show the patient's name or ID in the image itself, which "
            "de-identification does not remove: "
            + "; ".join(f"{b.label} ({b.why})" for b in burned_in)
            + ". Look at them, and confirm to share them.",
        )
    return burned_in


def _attach_reports(
    request: AuthedRequest, share: Share, studies: list[Study], text: str, pdf: UploadedFile | None
) -> None:
    """A report sent with a share is for that share's recipient only (and, on a patient link,
    for the patient, to whom the sender chose to send it)."""
    for study in studies:
        if pdf is not None:
            pdf.seek(0)
        try:
            report_attach(
                study=study,
                by=request.user,
                text=text,
                pdf=pdf,
                share=share,
                for_patient=share.kind == ShareKind.PATIENT,
                request=request,
            )
        except ReportError as exc:
            messages.error(request, f"The share was made, but the report was not attached: {exc}")
            return


@require_GET
@login_required
def inbox(request: AuthedRequest) -> HttpResponse:
    shares = (
        Share.objects.received_by(request.user)
        .select_related("facility", "created_by")
        .prefetch_related("studies")
        .order_by("-created_at")
    )
    page = Paginator(shares, 25).get_page(request.GET.get("page"))
    _audit_list(request, "inbox", page)
    return render(request, "transfers/inbox.html", {"page": page, "query": ""})


def _audit_list(request: AuthedRequest, name: str, page: Any) -> None:
    """A page listing shares shows their studies' patients: one event per page shown."""
    audit_record(
        action=AuditAction.STUDY_LIST,
        request=request,
        detail={
            "page": name,
            "page_number": page.number,
            "shares": [str(share.uuid) for share in page.object_list],
        },
    )


def _sent_shares(request: AuthedRequest):  # type: ignore[no-untyped-def]
    return Share.objects.filter(facility__in=upload_facilities(request.user))


@require_GET
@login_required
def sent(request: AuthedRequest) -> HttpResponse:
    if not upload_facilities(request.user).exists():
        # Readers and view-only members send nothing: no Sent page (the menu has none for them).
        raise Http404("No such page.")
    shares = (
        _sent_shares(request)
        .select_related("facility", "recipient_facility", "created_by")
        .prefetch_related("studies", "events")
        .order_by("-created_at")
    )
    page = Paginator(shares, 25).get_page(request.GET.get("page"))
    _audit_list(request, "sent", page)
    return render(
        request, "transfers/sent.html", {"page": page, "query": "", "now": timezone.now()}
    )


def _get_share_for_user(request: AuthedRequest, share_uuid: str) -> tuple[Share, bool]:
    """The share and whether the user is on the sending side; 404 for anyone else, and for a
    recipient once the share is revoked or expired."""
    share = (
        Share.objects.select_related("facility", "recipient_facility", "created_by")
        .filter(uuid=share_uuid)
        .first()
    )
    if share is None:
        raise Http404("No such share.")
    if share.facility in upload_facilities(request.user):
        return share, True
    if share.is_active and Share.objects.received_by(request.user).filter(pk=share.pk).exists():
        return share, False
    raise Http404("No such share.")


@require_GET
@login_required
def share_detail(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    share, is_sender = _get_share_for_user(request, share_uuid)
    if not is_sender:
        share_open(share=share, who=request.user.email, request=request, actor=request.user)
    else:
        # The recipient's opening is audited as share_open; the sender's look is audited here.
        audit_record(
            action=AuditAction.STUDY_LIST,
            request=request,
            facility=share.facility,
            detail={"page": "share", "share": str(share.uuid)},
        )
    return render(
        request,
        "transfers/share_detail.html",
        {
            "share": share,
            "is_sender": is_sender,
            "studies": share.studies.filter(purged_at__isnull=True),
            "events": share.events.all(),
            # The mapping of a de-identified copy stays at the sending facility.
            "copies": copies_of_share(share) if is_sender else [],
        },
    )


@require_http_methods(["GET", "POST"])
@login_required
def share_revoke_view(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    """Revoking cannot be undone, so it is asked first: GET (or a POST without `confirm`, e.g.
    an old form) shows what it will stop; only a POST with confirm=yes revokes."""
    share, is_sender = _get_share_for_user(request, share_uuid)
    if not is_sender:
        raise Http404("No such share.")
    if request.method == "POST" and request.POST.get("confirm") == "yes":
        share_revoke(share=share, by=request.user, request=request)
        if DeidentifiedCopy.objects.filter(share=share).exists():
            # Its de-identified copies belong to it: they go now, not at the nightly purge.
            task_queue_on_commit("transfers.tasks.purge_expired")
        messages.success(request, "The share is revoked: it stopped working for everyone at once.")
        return redirect("share_detail", share_uuid=share.uuid)
    if share.state != "active":
        return redirect("share_detail", share_uuid=share.uuid)
    audit_record(
        action=AuditAction.STUDY_LIST,
        request=request,
        facility=share.facility,
        detail={"page": "share revoke", "share": str(share.uuid)},
    )
    return render(
        request,
        "transfers/share_revoke.html",
        {"share": share, "studies": share.studies.filter(purged_at__isnull=True)},
    )


@require_POST
@login_required
def share_extend_view(request: AuthedRequest, share_uuid: str) -> HttpResponse:
    share, is_sender = _get_share_for_user(request, share_uuid)
    if not is_sender:
        raise Http404("No such share.")
    field = forms.DateField()
    try:
        day = field.clean(request.POST.get("expires_on"))
        share_extend(share=share, by=request.user, expires_at=_expiry(day), request=request)
    except (forms.ValidationError, ShareError) as exc:
        messages.error(
            request, exc.messages[0] if isinstance(exc, forms.ValidationError) else str(exc)
        )
    else:
        messages.success(request, "The expiry was changed.")
    return redirect("share_detail", share_uuid=share.uuid)
