"""Radiology reports attached to studies: a PDF or text typed in.

A report attached while sharing belongs to that share; one attached on the study page is for
every recipient of the study. Patients read only reports marked for them. `reports_visible` is
the one answer to "which reports may this person read", asked by the study page, the viewer,
the downloads (`report_response`) and the ZIP and disc image (transfers.media)."""

from __future__ import annotations

import uuid
from collections.abc import Collection

from django.core.files.base import File
from django.core.files.storage import storages
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone

from portal.audit import audit_record
from portal.models import AuditAction, User

from .access import StudyAccess
from .deliveries import receiving_facility_of
from .models import Report, Share, ShareKind, Study

MAX_REPORT_BYTES = 20 * 1024 * 1024
MAX_REPORT_TEXT = 50_000


class ReportError(Exception):
    pass


def reports_for(
    study: Study, *, share_ids: Collection[int] | None, patient: bool = False
) -> QuerySet[Report]:
    """The study's reports someone reads through `share_ids` (None: the facility holding the
    study, which reads all); a patient reads only those marked for the patient."""
    reports = study.reports.select_related("uploaded_by", "share__recipient_facility")
    if share_ids is None:
        return reports.all()
    reports = reports.filter(Q(share__isnull=True) | Q(share_id__in=list(share_ids)))
    return reports.filter(for_patient=True) if patient else reports


def _forwarded_reports(forwarded_from_ids: Collection[int]) -> Q:
    """What a doctor reads through a share a patient forwarded: what that patient reads (the
    reports marked for the patient, of the study or of the patient's own share), no more."""
    return Q(for_patient=True) & (Q(share__isnull=True) | Q(share_id__in=list(forwarded_from_ids)))


def reports_for_share(study: Study, share: Share | None) -> QuerySet[Report]:
    """The study's reports read through one share (None: the holding facility, all of them)."""
    if share is None:
        return reports_for(study, share_ids=None)
    if share.forwarded_from_id is not None:
        return study.reports.select_related("uploaded_by", "share__recipient_facility").filter(
            _forwarded_reports([share.forwarded_from_id])
        )
    return reports_for(study, share_ids={share.pk}, patient=share.kind == ShareKind.PATIENT)


def reports_visible(access: StudyAccess) -> QuerySet[Report]:
    """The reports of the study that this access may read. Through a share a patient forwarded,
    only what the patient reads: forwarding never widens what reaches anyone."""
    if access.is_owner:
        return reports_for(access.study, share_ids=None)
    direct = access.share_ids - access.forward_ids
    reports = access.study.reports.select_related("uploaded_by", "share__recipient_facility")
    readable = Q(pk__in=[])
    if direct:
        own = Q(share__isnull=True) | Q(share_id__in=list(direct))
        readable |= own & Q(for_patient=True) if access.is_patient else own
    if access.forward_ids:
        readable |= _forwarded_reports(access.forwarded_from_ids)
    return reports.filter(readable)


def report_attach(
    *,
    study: Study,
    by: User,
    text: str = "",
    pdf: UploadedFile | None = None,
    share: Share | None = None,
    for_patient: bool = False,
    request: HttpRequest | None = None,
) -> Report:
    """Attach one report, for the recipients of `share` (None: every recipient of the study),
    and for patients too when `for_patient`. The PDF is written to storage first and removed if
    the row fails."""
    text = text.strip()
    if not text and pdf is None:
        raise ReportError("Type the report or choose a PDF.")
    if text and pdf is not None:
        raise ReportError("Attach either a PDF or typed text, not both at once.")
    if study.purged_at is not None:
        raise ReportError("The study's images were purged; it takes no new reports.")
    if len(text) > MAX_REPORT_TEXT:
        raise ReportError(f"A typed report is at most {MAX_REPORT_TEXT} characters.")
    key = ""
    name = ""
    size = 0
    storage = storages["default"]
    if pdf is not None:
        size = pdf.size or 0
        if size == 0 or size > MAX_REPORT_BYTES:
            raise ReportError(f"A report PDF is 1 byte to {MAX_REPORT_BYTES // 1048576} MB.")
        head = pdf.read(5)
        pdf.seek(0)
        if head != b"%PDF-":
            raise ReportError("That file is not a PDF.")
        name = (pdf.name or "report.pdf").replace("/", "_")[-200:]
        key = storage.save(
            f"reports/{study.facility.uuid}/{study.study_instance_uid}/{uuid.uuid4().hex}.pdf",
            File(pdf),
        )
    try:
        with transaction.atomic():
            report = Report.objects.create(
                study=study,
                text=text,
                storage_key=key,
                filename=name,
                size_bytes=size,
                uploaded_by=by,
                share=share,
                for_patient=for_patient,
            )
            audit_record(
                action=AuditAction.REPORT_ATTACH,
                request=request,
                actor=by,
                study=study,
                detail={
                    "report": str(report.uuid),
                    "kind": "pdf" if key else "text",
                    "share": str(share.uuid) if share else None,
                    "for_patient": for_patient,
                },
            )
    except BaseException:
        if key:
            storage.delete(key)
        raise
    return report


def report_response(
    request: HttpRequest, access: StudyAccess, report_uuid: str
) -> HttpResponseBase:
    """A report of the study as a download, audited; 404 when it is not one this access may
    read (another study's, or attached to a share that is not theirs)."""
    report = reports_visible(access).filter(uuid=report_uuid).first()
    if report is None:
        raise Http404("No such report.")
    audit_record(
        action=AuditAction.REPORT_VIEW,
        request=request,
        study=access.study,
        actor_facility=receiving_facility_of(share=access.share, user=request.user),
        detail={"report": str(report.uuid)},
    )
    # As for studies, the saved file's name says when, not who: the name the PDF was uploaded
    # under (often the patient's) is shown on the page to those who may read it, never put in
    # download lists and browser history.
    stem = f"report-{timezone.localtime(report.created_at):%Y%m%d}-{str(report.uuid)[:8]}"
    response: HttpResponseBase
    if report.is_pdf:
        response = FileResponse(
            storages["default"].open(report.storage_key),
            content_type="application/pdf",
            as_attachment=True,
            filename=f"{stem}.pdf",
        )
    else:
        response = HttpResponse(report.text, content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{stem}.txt"'
    response["Cache-Control"] = "private, no-store"
    return response
