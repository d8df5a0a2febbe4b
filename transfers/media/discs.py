"""Disc images: a CD or DVD image (ISO 9660 + Joliet, IHE PDI layout) of a study, built by a
Celery task with its progress on the page, kept in storage, and downloaded like the ZIP.

The image is built into a temporary file (pycdlib needs to seek) and then saved to storage,
so S3 serves it too; the study's purge deletes it with the images.
"""

from __future__ import annotations

import logging
import tempfile

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from portal.emails import email_queue
from portal.models import User

from .. import integrity
from ..access import StudyAccess
from ..models import ExportStatus, Instance, MediaExport
from ..queue import task_queue_on_commit
from ..reports import reports_for_share
from .export import DVD_BYTES, ExportError, export_plan, iso_build, iso_size, media_kind_for

log = logging.getLogger(__name__)

# Progress is written at most this often (in bytes of the image), not once per block.
PROGRESS_STEP = 4 * 1024 * 1024


class MediaError(Exception):
    """Shown to the person who asked for the disc image."""


def media_export_create(*, access: StudyAccess, by: User) -> MediaExport:
    if not access.can_download:
        raise MediaError("This share lets you view the study but not take a copy.")
    with transaction.atomic():
        export = MediaExport.objects.create(study=access.study, share=access.share, requested_by=by)
        task_queue_on_commit("transfers.media.tasks.media_build_task", export.pk)
    return export


def media_build(*, export: MediaExport) -> MediaExport:
    """Build the image; idempotent (a second run of a built or running export does nothing)."""
    claimed = MediaExport.objects.filter(pk=export.pk, status=ExportStatus.QUEUED)
    if not claimed.update(status=ExportStatus.BUILDING):
        export.refresh_from_db()
        return export
    study = export.study
    try:
        # The reports its requester may read: the holding facility's all, a recipient's those
        # for every recipient and those sent with the share the image was asked under.
        share = export.share
        plan = export_plan(studies=[study], reports_of=lambda s: reports_for_share(s, share))
        total = iso_size(plan)
        if total > DVD_BYTES and plan.frames:
            # The disc viewer's frames would push the images off one DVD: the images come
            # first, and a DICOM viewer still opens the disc.
            plan = plan.without_viewer()
            total = iso_size(plan)
        media = media_kind_for(total)
        # The DICOMDIR's File-set ID (PS3.12 F.1.1): no patient name on the disc's label.
        label = plan.file_set_id
    except ExportError as exc:
        return _failed(export, str(exc))
    MediaExport.objects.filter(pk=export.pk).update(
        media=media,
        volume_label=label,
        total_bytes=total,
        image_bytes=plan.image_bytes,
        images=plan.images,
    )
    written = {"at": 0}

    def progress(done: int, _total: int) -> None:
        if done - written["at"] >= PROGRESS_STEP or done >= total:
            written["at"] = done
            MediaExport.objects.filter(pk=export.pk).update(done_bytes=done)

    storage = storages["default"]
    key = f"exports/{study.facility.uuid}/{study.uuid}/{export.uuid}.iso"
    try:
        with tempfile.TemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR) as out:
            iso_build(plan, out=out, progress=progress)
            out.seek(0)
            key = storage.save(key, File(out, name=f"{export.uuid}.iso"))
    except integrity.IntegrityError as exc:
        # A damaged image: the disc image is not finished (its temporary file goes), the
        # requester is told why, and staff are alerted.
        instance = Instance.objects.filter(storage_key=exc.key).first()
        integrity.integrity_failure(instance, "disc image", key=exc.key, reason=exc.reason)
        return _failed(
            export,
            "A stored image of this study is damaged, so the disc image was not made; "
            "the Relay team has been told.",
        )
    except (ExportError, OSError) as exc:
        log.exception("disc image %s failed", export.uuid)
        return _failed(export, str(exc))
    with transaction.atomic():
        ready = MediaExport.objects.filter(pk=export.pk).update(
            status=ExportStatus.READY,
            storage_key=key,
            done_bytes=total,
            finished_at=timezone.now(),
        )
        if not ready:
            # The study was purged while the image was being built: it must not stay behind.
            storage.delete(key)
            log.info("disc image %s dropped: its study was purged meanwhile", export.uuid)
            return export
        link = reverse("media_export", args=[study.uuid, export.uuid])
        email_queue(
            name="media_ready",
            to=export.requested_by.email,
            context={"export": MediaExport(media=media), "link": link},
        )
    export.refresh_from_db()
    log.info("disc image %s ready: %s, %d bytes", export.uuid, media, total)
    return export


def _failed(export: MediaExport, reason: str) -> MediaExport:
    MediaExport.objects.filter(pk=export.pk).update(
        status=ExportStatus.FAILED, error=reason[:300], finished_at=timezone.now()
    )
    export.refresh_from_db()
    return export
