"""Integrity of the stored images on the way out, and the scrub that looks for damage at rest.

Every stored DICOM object has the SHA-256 and the size it had when it was received
(`Instance.sha256`, `Instance.size_bytes`). Whatever hands one out (the ZIP, the disc image, the
push, the viewer's renders, later DICOMweb) reads it through `VerifyingReader`, which hashes the
bytes as they pass and raises `IntegrityError` when the object ends (or outgrows its size)
without matching. The caller then fails that delivery loudly and calls `integrity_failure`:
an `integrity_failed` audit event naming the object, and an e-mail to staff.

`storage_verify` is the scrub (`manage.py storage_verify`, and a nightly Celery task): every
instance's object read and hashed, objects with no row looked for, the progress kept in a
`StorageVerifyRun` so a killed run carries on where it stopped.

`IntegrityError` here is not `django.db.IntegrityError`: callers write `integrity.IntegrityError`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import IO, Any

from django.conf import settings
from django.core.cache import cache
from django.core.files.storage import Storage, storages
from django.http import HttpRequest
from django.utils import timezone

from portal import metrics
from portal.audit import audit_record
from portal.emails import email_queue
from portal.models import AuditAction, Facility, Outcome, User

from .models import Instance
from .models.studies import StorageVerifyRun

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# One e-mail per damaged object per this many seconds: a recipient retrying a broken download
# ten times is ten audit events but one alert.
ALERT_EVERY_S = 3600
# Problems kept on a scrub run's row for its report; the counts go on past it.
PROBLEMS_KEPT = 1000


class IntegrityError(Exception):
    """A stored object does not match the SHA-256 or the size recorded when it was received."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"The stored object {key} is damaged: {reason}")
        self.key = key
        self.reason = reason


class VerifyingReader:
    """A stored object opened for reading, hashed as it is read.

    Reading it to its end checks it: the read that finds the end raises `IntegrityError` on a
    wrong digest or size, before it returns, so a caller that hands bytes on one read behind
    (the ZIP) never hands on the last bytes of a damaged object. Reads may seek (pydicom does):
    whatever was skipped is read and hashed by `verify()`, which callers that stop before the
    end (a known size read, a frame decoded out of the middle) call when they are done.

    `sha256` empty checks only the size (a report's PDF has no recorded digest). `at_end` False
    leaves the check to the caller's `verify()` (a decoder that would wrap the error in its own).
    """

    def __init__(
        self, fh: IO[bytes], *, key: str, size: int, sha256: str = "", at_end: bool = True
    ) -> None:
        self._fh = fh
        self._at_end = at_end
        self.key = key
        self.size = size
        self.sha256 = sha256
        self._digest = hashlib.sha256()
        self._hashed = 0  # bytes hashed, all from the start: [0, _hashed)
        self._pos = 0
        self.verified = False

    # -- the file interface pydicom, pycdlib and shutil need ----------------------------------

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n) if n is not None and n >= 0 else self._fh.read()
        start = self._pos
        self._pos += len(data)
        if start <= self._hashed < self._pos:
            self._digest.update(memoryview(data)[self._hashed - start :])
            self._hashed = self._pos
            if self._hashed > self.size:
                raise IntegrityError(self.key, f"it holds more than the {self.size} bytes recorded")
        if self._at_end and ((not data and n != 0) or n is None or n < 0):
            self.verify()  # the end: checked before these (last) bytes are returned
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._fh.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(getattr(self._fh, "seekable", lambda: True)())

    def close(self) -> None:
        self._fh.close()

    @property
    def closed(self) -> bool:
        return bool(getattr(self._fh, "closed", False))

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the check ----------------------------------------------------------------------------

    def verify(self) -> None:
        """Hash what has not been hashed yet, to the end, and compare; idempotent.

        Leaves the position at the end of the object."""
        if self.verified:
            return
        if self._pos != self._hashed:
            self._pos = self._fh.seek(self._hashed)
        while True:
            data = self._fh.read(CHUNK)
            if not data:
                break
            self._digest.update(data)
            self._hashed += len(data)
            self._pos = self._hashed
            if self._hashed > self.size:
                raise IntegrityError(self.key, f"it holds more than the {self.size} bytes recorded")
        if self._hashed != self.size:
            raise IntegrityError(
                self.key, f"it holds {self._hashed} bytes, not the {self.size} recorded"
            )
        if self.sha256 and self._digest.hexdigest() != self.sha256:
            raise IntegrityError(self.key, "its SHA-256 is not the one recorded when it arrived")
        self.verified = True


def verified_open(
    storage: Storage, key: str, *, size: int, sha256: str = "", at_end: bool = True
) -> VerifyingReader:
    """Open a stored object for reading through a `VerifyingReader` (FileNotFoundError when it
    is missing)."""
    return VerifyingReader(
        storage.open(key, "rb"), key=key, size=size, sha256=sha256, at_end=at_end
    )


def instance_open(
    instance: Instance, storage: Storage | None = None, *, at_end: bool = True
) -> VerifyingReader:
    """The instance's stored object, checked against its recorded SHA-256 and size as it is read.

    The viewer's source read uses this with `at_end=False` in place of
    `storage.open(instance.storage_key, "rb")`, and calls `reader.verify()` after decoding and
    before storing or sending any render."""
    return verified_open(
        storage or storages["default"],
        instance.storage_key,
        size=instance.size_bytes,
        sha256=instance.sha256,
        at_end=at_end,
    )


def instance_verify(instance: Instance, storage: Storage | None = None) -> None:
    """Read the whole stored object and check it (IntegrityError, FileNotFoundError)."""
    with instance_open(instance, storage) as reader:
        reader.verify()


# --- when it fails --------------------------------------------------------------------------


def integrity_failure(
    instance: Instance | None,
    where: str,
    request: HttpRequest | None = None,
    *,
    key: str = "",
    reason: str = "",
    alert: bool = True,
) -> None:
    """A damaged (or missing) stored object was found on its way out (`where`: "zip", "disc
    image", "push", "viewer", "storage_verify"): audit it, log it, and tell staff.

    The audit event names the object (its storage key, the instance, its study); the e-mail to
    staff names the instance by its database id and the facility, never the patient."""
    key = key or (instance.storage_key if instance is not None else "")
    log.error("integrity check failed during %s: %s (%s)", where, key, reason)
    metrics.INTEGRITY_FAILURES.labels(where=where).inc()
    facility: Facility | None = None
    detail: dict[str, Any] = {"where": where, "key": key, "reason": reason}
    study = None
    if instance is not None:
        # Fresh, with its study: the row may have gone meanwhile (a purge), the event stays.
        instance = (
            Instance.objects.select_related("series__study__facility")
            .filter(pk=instance.pk)
            .first()
        )
    if instance is not None:
        study = instance.series.study
        facility = study.facility
        detail["instance"] = instance.pk
        detail["sop_instance_uid"] = instance.sop_instance_uid
    audit_record(
        action=AuditAction.INTEGRITY_FAILED,
        request=request,
        study=study,
        facility=facility,
        outcome=Outcome.FAILURE,
        detail=detail,
    )
    if alert and cache.add(
        f"integrity-alert:{hashlib.sha256(key.encode()).hexdigest()}", 1, ALERT_EVERY_S
    ):
        _staff_tell(
            "integrity_failed",
            {
                "where": where,
                "instance_id": instance.pk if instance is not None else None,
                "facility": facility,
                "reason": reason,
            },
        )


def _staff_tell(name: str, context: dict[str, Any]) -> None:
    for email in User.objects.filter(is_staff=True, is_active=True).values_list("email", flat=True):
        email_queue(name=name, to=email, context=context)


# --- the scrub ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    kind: str  # "missing", "corrupt", "extra"
    key: str
    facility: str  # slug
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "key": self.key,
            "facility": self.facility,
            "reason": self.reason,
        }


def storage_verify(
    *,
    facility: Facility | None = None,
    since: date | None = None,
    restart: bool = False,
    limit: int | None = None,
    seconds: float | None = None,
    tell_staff: bool = True,
) -> StorageVerifyRun:
    """Check the stored objects of one facility (or all) against the index; resumable.

    The unfinished run of the same facility and `since` is carried on from the last instance it
    checked (`restart` starts a new one). Every instance received on or after `since` is read
    and hashed ("missing", "corrupt"); then the objects under each facility's `dicom/` folder
    with no instance are listed ("extra"; those written in the last hour are left alone: an
    upload writes its object before its row). `limit` (instances) or `seconds` stop the run
    early, unfinished, for the next run to carry on. A finished run e-mails staff its summary.
    """
    run = None
    if not restart:
        run = (
            StorageVerifyRun.objects.filter(facility=facility, since=since, finished_at=None)
            .order_by("-pk")
            .first()
        )
    if run is None:
        run = StorageVerifyRun.objects.create(facility=facility, since=since)
    storage = storages["default"]
    deadline = time.monotonic() + seconds if seconds is not None else None
    budget = limit

    def out_of_time() -> bool:
        return (budget is not None and budget <= 0) or (
            deadline is not None and time.monotonic() >= deadline
        )

    # Phase 1: every instance's object, in id order from where the last run stopped.
    instances = Instance.objects.exclude(storage_key="").filter(pk__gt=run.last_instance_id)
    if facility is not None:
        instances = instances.filter(facility=facility)
    if since is not None:
        instances = instances.filter(created_at__gte=_day_start(since))
    while not run.instances_done and not out_of_time():
        batch = list(
            instances.filter(pk__gt=run.last_instance_id)
            .select_related("facility")
            .order_by("pk")[:200]
        )
        if not batch:
            run.instances_done = True
            run.save(update_fields=["instances_done"])
            break
        for instance in batch:
            if out_of_time():
                break
            problem = _instance_check(storage, instance)
            if problem is not None:
                _note(run, problem)
                integrity_failure(instance, "storage_verify", reason=problem.reason, alert=False)
            run.checked += 1
            metrics.STORAGE_VERIFY_CHECKED.inc()
            run.checked_bytes += instance.size_bytes
            run.last_instance_id = instance.pk
            if budget is not None:
                budget -= 1
            # Progress is saved per object: a killed run re-reads at most one.
            run.save(update_fields=_PROGRESS_FIELDS)

    # Phase 2: objects with no instance, facility by facility, study folder by study folder,
    # in the order of their paths (so `last_folder` says where to carry on).
    if run.instances_done and not run.extras_done:
        facilities = Facility.objects.all()
        if facility is not None:
            facilities = facilities.filter(pk=facility.pk)
        stopped = False
        for fac in sorted(facilities, key=lambda f: str(f.uuid)):
            folder = f"dicom/{fac.uuid}"
            if run.last_folder and folder < run.last_folder.rsplit("/", 1)[0]:
                continue
            for study_folder in sorted(_dirs(storage, folder)):
                path = f"{folder}/{study_folder}"
                if run.last_folder and path <= run.last_folder:
                    continue
                if out_of_time():
                    stopped = True
                    break
                for problem in _extras(storage, path, fac, since):
                    _note(run, problem)
                run.last_folder = path
                run.save(update_fields=_PROGRESS_FIELDS)
            if stopped:
                break
        if not stopped:
            run.extras_done = True
            run.save(update_fields=["extras_done"])

    if run.instances_done and run.extras_done and run.finished_at is None:
        run.finished_at = timezone.now()
        run.save(update_fields=["finished_at"])
        if tell_staff:
            _staff_tell("storage_verify", {"run": run, "report": storage_verify_report(run)})
    return run


_PROGRESS_FIELDS = [
    "checked",
    "checked_bytes",
    "last_instance_id",
    "last_folder",
    "missing",
    "corrupt",
    "extra",
    "problems",
]


def _day_start(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, datetime.min.time()))


def _instance_check(storage: Storage, instance: Instance) -> _Problem | None:
    slug = instance.facility.slug
    try:
        instance_verify(instance, storage)
    except FileNotFoundError:
        return _Problem("missing", instance.storage_key, slug, "the stored object is missing")
    except IntegrityError as exc:
        return _Problem("corrupt", instance.storage_key, slug, exc.reason)
    except OSError as exc:
        return _Problem("missing", instance.storage_key, slug, f"could not be read: {exc}")
    return None


def _note(run: StorageVerifyRun, problem: _Problem) -> None:
    metrics.STORAGE_VERIFY_FINDINGS.labels(kind=problem.kind).inc()
    setattr(run, problem.kind, getattr(run, problem.kind) + 1)
    if len(run.problems) < PROBLEMS_KEPT:
        run.problems = [*run.problems, problem.as_dict()]
    run.save(update_fields=_PROGRESS_FIELDS)


def _dirs(storage: Storage, path: str) -> list[str]:
    try:
        dirs, _ = storage.listdir(path)
    except FileNotFoundError:
        return []
    return list(dirs)


def _files(storage: Storage, path: str) -> list[str]:
    try:
        _, files = storage.listdir(path)
    except FileNotFoundError:
        return []
    return list(files)


def _extras(
    storage: Storage, study_folder: str, facility: Facility, since: date | None
) -> list[_Problem]:
    """Objects in one study folder (dicom/<facility>/<study>/<series>/<file>) with no row."""
    grace = timedelta(minutes=getattr(settings, "RELAY_STORAGE_VERIFY_GRACE_MINUTES", 60))
    found: list[_Problem] = []
    for series_folder in sorted(_dirs(storage, study_folder)):
        prefix = f"{study_folder}/{series_folder}/"
        known = set(
            Instance.objects.filter(storage_key__startswith=prefix).values_list(
                "storage_key", flat=True
            )
        )
        for name in sorted(_files(storage, prefix.rstrip("/"))):
            key = prefix + name
            if key in known:
                continue
            try:
                modified = storage.get_modified_time(key)
            except (NotImplementedError, OSError):
                modified = None
            if modified is not None:
                if modified > timezone.now() - grace:
                    continue  # an upload in flight writes its object before its row
                if since is not None and modified < _day_start(since):
                    continue
            found.append(_Problem("extra", key, facility.slug, "no instance refers to it"))
    return found


def storage_verify_report(run: StorageVerifyRun) -> str:
    """The run as plain text, for the command's output and staff's e-mail."""
    scope = run.facility.slug if run.facility is not None else "every facility"
    lines = [
        f"Storage check #{run.pk} of {scope}"
        + (f", images received since {run.since:%Y-%m-%d}" if run.since else ""),
        f"Started {run.started_at:%Y-%m-%d %H:%M} UTC"
        + (
            f", finished {run.finished_at:%Y-%m-%d %H:%M} UTC"
            if run.finished_at
            else ", not finished"
        ),
        f"Checked: {run.checked} objects ({run.checked_bytes / 1e9:.2f} GB)",
        f"Missing: {run.missing}",
        f"Damaged: {run.corrupt}",
        f"Extra (no image refers to them): {run.extra}",
    ]
    if run.problems:
        lines.append("")
        lines.extend(
            f"  {p['kind']:8} {p['facility']}  {p['key']}  {p['reason']}" for p in run.problems
        )
        if len(run.problems) < run.missing + run.corrupt + run.extra:
            lines.append(
                f"  ... and {run.missing + run.corrupt + run.extra - len(run.problems)} more"
            )
    return "\n".join(lines) + "\n"
