"""Push to PACS: a recipient sends a study into one of their facility's PACS with C-STORE.

One association per run. Each instance is offered in its own transfer syntax, with explicit and
implicit little endian as the fallback; when the destination accepts only the fallback, the
instance is decompressed (or byte-swapped, for big endian) on the way, keeping its SOP Instance
UID: it is the same image, not a new one. Every instance's answer is recorded, so a re-run
sends only what has not arrived yet.

A run that cannot reach the destination, or that is told "out of resources", is retried by the
Celery task with backoff (`push_retry_delay`), and the push says when the next attempt is until
then; a push waiting in the queue or for its next attempt can be cancelled. Refusals that will not change ("data set does not match SOP class")
are recorded and shown, and are not retried on their own.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from django.conf import settings
from django.core.files.storage import Storage, storages
from django.db import transaction
from django.db.models import Count, Q
from django.http import HttpRequest
from django.utils import timezone

from portal import metrics
from portal.audit import audit_record
from portal.models import COPY_ROLES, AuditAction, Membership, User

from .. import dicomio, integrity
from ..access import StudyAccess
from ..deliveries import DeliveryKind, delivery_announce
from ..models import (
    Instance,
    PacsDestination,
    Push,
    PushInstance,
    PushStatus,
    Share,
    ShareEvent,
    ShareEventKind,
    ShareKind,
    Study,
)
from ..queue import task_queue_on_commit
from .convert import converted_copy
from .net import tcp_nodelay_enable
from .outbound import OutboundRefused, outbound_address
from .tls import push_context

if TYPE_CHECKING:
    from pynetdicom import AE

# pynetdicom (and pydicom, which it imports) are imported where an association is made: the
# PACS pages' views import this module, and a web worker serving pages loads neither
# (tests/relay/test_lean_imports.py).

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
# Explicit and implicit VR little endian (PS3.5 A.2, A.1): the syntaxes every PACS takes.
UNCOMPRESSED: list[str] = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
# pynetdicom (and the standard) allow at most 128 presentation contexts per association.
MAX_CONTEXTS = 128
TIMEOUT_S = 30
# pynetdicom's connection thread sleeps this long whenever it finds nothing to do (its default
# is 1 ms): between the data PDUs it is handed and while waiting for each C-STORE's answer. At
# 1 ms a 300-instance push spent about a second asleep; shorter costs CPU the PACS may need
# when both run on one machine (0.3 ms measured best into Orthanc).
RUN_LOOP_DELAY_S = 0.0003
# The answers are written every so often in one transaction, not one commit per instance.
RECORD_EVERY_S = 0.5
# Stored files checked against their SHA-256 ahead of the one being sent, in a thread: the
# check of the next overlaps the sending of this one and the PACS's answer.
VERIFY_AHEAD = 2
# Retries after the first attempt of a run; the last failure gives up (pushes_give_up).
PUSH_RETRIES = 8
PUSH_ATTEMPTS = PUSH_RETRIES + 1


class _Held(threading.Event):
    """Stands in for an association's reactor checkpoint while a push sends (`_reactor_held`):
    the set() at the end of each send_c_store is ignored."""

    def set(self) -> None:
        pass


@contextmanager
def _reactor_held(assoc: Any) -> Iterator[None]:
    """Keep pynetdicom's association reactor paused from the first C-STORE to the last.

    On a requestor's association that reactor only serves requests from the peer (none come
    during a push) and notices a release or an abort. send_c_store pauses it and resumes it for
    every instance, and it checks its pause only every millisecond: about 0.2 s of waiting in a
    300-instance push. Held, it is resumed once, at the end; `_ended` notices an abort between
    two instances meanwhile. Left alone when pynetdicom no longer has these internals."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if not isinstance(checkpoint, threading.Event) or not hasattr(assoc, "_is_paused"):
        yield
        return
    checkpoint.clear()
    deadline = time.monotonic() + 1
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0001)
    # `_is_paused` may still be True from its previous pause while it has just been woken: a
    # reactor in that state finishes its round (it has nothing to take yet) and stops again.
    time.sleep(0.002)
    assoc._reactor_checkpoint = _Held()
    try:
        yield
    finally:
        assoc._reactor_checkpoint = checkpoint
        checkpoint.set()


def _ended(assoc: Any) -> bool:
    """The peer aborted, or the connection is gone (what the held reactor would notice)."""
    try:
        return not assoc.dul.is_alive() or bool(assoc.acse.is_aborted())
    except AttributeError:
        return False


def _wait_until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


class PushError(Exception):
    """The push cannot be made (no right, not this facility's destination): shown to the user."""


class PushTransient(Exception):
    """The destination is unreachable or busy: the task tries again later."""


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str


def _ae() -> AE:
    from pynetdicom import AE, _config

    tcp_nodelay_enable()
    # Files sent by path are streamed as stored instead of decoded and encoded again.
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=settings.DICOM_GATEWAY_AE_TITLE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    return ae


def _tls_args(destination: PacsDestination) -> tuple[ssl.SSLContext, str] | None:
    """TLS for a destination that asks for it: its certificate must chain to its CA
    certificates and name its host (checked against `host` as the admin typed it, not the
    address it resolved to)."""
    if not destination.tls:
        return None
    return push_context(destination.tls_ca_certificates), destination.host


def _associate(ae: AE, destination: PacsDestination, **kwargs: Any) -> Any:
    address = outbound_address(destination.host, destination.port)
    return ae.associate(
        address,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=_tls_args(destination),
        **kwargs,
    )


def _tls_hint(destination: PacsDestination) -> str:
    """What to check when a TLS destination does not answer: pynetdicom reports a failed
    handshake as no answer (the reason is in the worker's log)."""
    if not destination.tls:
        return ""
    return (
        f" over TLS (check that its certificate chains to the CA certificates given and names"
        f" {destination.host})"
    )


def destination_echo(*, destination: PacsDestination) -> EchoResult:
    """The "Test connection" button: C-ECHO, and what happened in words."""
    ae = _ae()
    ae.add_requested_context(VERIFICATION)
    try:
        assoc = _associate(ae, destination)
    except OutboundRefused as exc:
        result = EchoResult(False, f"Refused: {exc}")
    except ssl.SSLError as exc:
        result = EchoResult(False, f"TLS failed: {exc.reason or exc}")
    except (OSError, ValueError) as exc:
        result = EchoResult(False, f"Could not connect: {exc}")
    else:
        if not assoc.is_established:
            result = EchoResult(
                False,
                "The PACS refused the association (check the AE titles)"
                if assoc.is_rejected
                else f"No answer from {destination.host}:{destination.port}{_tls_hint(destination)}",
            )
        else:
            status = assoc.send_c_echo()
            assoc.release()
            code = getattr(status, "Status", None)
            result = (
                EchoResult(True, "C-ECHO succeeded")
                if code == 0
                else EchoResult(False, f"C-ECHO answered status {code}")
            )
    PacsDestination.objects.filter(pk=destination.pk).update(
        last_echo_at=timezone.now(), last_echo_ok=result.ok, last_echo_message=result.message
    )
    return result


def push_create(
    *,
    access: StudyAccess,
    destination: PacsDestination,
    by: User,
    request: HttpRequest | None = None,
) -> Push:
    """Queue a push of the study the user may open into one of their facility's PACS."""
    share = push_share(access=access, destination=destination, by=by)
    study = access.study
    if Study.objects.filter(pk=study.pk, reconcile_running=True).exists():
        raise PushError("The patient of this study is being reconciled; send it when that is done.")
    with transaction.atomic():
        # One push of a study to a destination at a time (a double-clicked Send is one push,
        # sent and billed once): the study row's lock makes the check hold.
        Study.objects.select_for_update().filter(pk=study.pk).values_list("pk").first()
        if Push.objects.filter(
            study=study,
            destination=destination,
            status__in=[PushStatus.QUEUED, PushStatus.RUNNING],
        ).exists():
            raise PushError(f"This study is already being sent to {destination.name}.")
        push = Push.objects.create(
            study=study, destination=destination, share=share, requested_by=by
        )
        PushInstance.objects.bulk_create(
            PushInstance(push=push, instance_id=pk)
            for pk in Instance.objects.filter(series__study=study).values_list("pk", flat=True)
        )
        _audit_push(push, share=share, by=by, request=request)
        push_queue(push)
    return push


def _audit_push(
    push: Push,
    *,
    share: Share | None,
    by: User,
    request: HttpRequest | None,
    rerun: bool = False,
    cancelled: bool = False,
) -> None:
    detail: dict[str, object] = {"destination": str(push.destination), "push": str(push.uuid)}
    if rerun:
        detail["rerun"] = True
    if cancelled:
        detail["cancelled"] = True
    if share:
        detail["share"] = str(share.uuid)
    # The facility that owns the PACS is the one the person acted for.
    audit_record(
        action=AuditAction.PUSH_CANCEL if cancelled else AuditAction.STUDY_PUSH,
        request=request,
        actor=by,
        actor_facility=push.destination.facility,
        study=push.study,
        detail=detail,
    )


def push_share(*, access: StudyAccess, destination: PacsDestination, by: User) -> Share | None:
    """What lets `by` send the study into `destination`: None for the facility that holds the
    study (into its own PACS only), else the active share with import rights that reaches the
    destination's facility (a facility share: that facility; a physician's: their own).
    PushError when nothing does, so a study never lands in a PACS it was not shared with."""
    study = access.study
    member = Membership.objects.filter(user=by, facility_id=destination.facility_id).first()
    if member is None:
        raise PushError("You can send only to your own facility's PACS.")
    if member.role not in COPY_ROLES:
        raise PushError("View-only members cannot send studies to a PACS.")
    if destination.facility_id == study.facility_id:
        return None
    share = (
        Share.objects.received_by(by)
        .filter(studies=study, can_import=True)
        .filter(
            Q(kind=ShareKind.FACILITY, recipient_facility_id=destination.facility_id)
            | Q(kind=ShareKind.PHYSICIAN)
        )
        .order_by("-created_at")
        .first()
    )
    if share is None:
        raise PushError(
            f"No active share of this study allows importing it into {destination.facility.name}'s PACS."
        )
    return share


def push_rerun(
    *, push: Push, access: StudyAccess, by: User, request: HttpRequest | None = None
) -> bool:
    """Send again what did not arrive; False when everything already has. The rights are
    asked again (PushError): a share revoked since the first run sends nothing more."""
    share = push_share(access=access, destination=push.destination, by=by)
    with transaction.atomic():
        if not push.items.filter(sent=False).exists():
            return False
        updated = Push.objects.filter(pk=push.pk).exclude(status=PushStatus.RUNNING)
        if not updated.update(status=PushStatus.QUEUED, error="", finished_at=None, share=share):
            return False
        _audit_push(push, share=share, by=by, request=request, rerun=True)
        push_queue(push)
    return True


def push_queue(push: Push) -> None:
    task_queue_on_commit("transfers.dicom.tasks.push_run", push.pk)


def push_cancel(*, push: Push, by: User, request: HttpRequest | None = None) -> bool:
    """Stop a push that waits in the queue or for its next attempt; False when it is sending
    or has ended. A retry Celery already scheduled finds it cancelled and does nothing. What
    the PACS already accepted stays there. Those who may send to that PACS may cancel; a
    view-only member gets PushError."""
    member = Membership.objects.filter(user=by, facility_id=push.destination.facility_id).first()
    if member is None or member.role not in COPY_ROLES:
        raise PushError("Only those who may send to this PACS can cancel a push to it.")
    with transaction.atomic():
        # Claimed like push_send claims it: of the two, only one wins the queued push.
        claimed = Push.objects.filter(pk=push.pk, status=PushStatus.QUEUED).update(
            status=PushStatus.CANCELLED,
            next_attempt_at=None,
            next_attempt=0,
            error=f"Cancelled by {by.email}"[:300],
            finished_at=timezone.now(),
        )
        if not claimed:
            return False
        _audit_push(push, share=push.share, by=by, request=request, cancelled=True)
    push.refresh_from_db()
    return True


def push_retry_delay(retries: int) -> int:
    """Seconds before the next attempt after `retries` retries: 30 s, doubling, at most an hour."""
    return int(min(3600, 30 * 2**retries))


def push_retry_schedule(*, push: Push, retries: int) -> bool:
    """Record when the retry the task is about to ask for will run; False when the push is no
    longer waiting for one (cancelled meanwhile), and no retry should be asked for."""
    return bool(
        Push.objects.filter(pk=push.pk, status=PushStatus.QUEUED).update(
            next_attempt_at=timezone.now() + timedelta(seconds=push_retry_delay(retries)),
            next_attempt=retries + 2,  # the first attempt was 1, the first retry 2
        )
    )


def push_send(*, push: Push) -> Push:
    """Send the instances of the push not yet accepted; record each answer.

    Raises PushTransient when the destination could not be reached or asked to try later.
    A cancelled push is left alone.
    """
    if push.status == PushStatus.CANCELLED:
        return push
    if (
        push.share_id is not None
        and not Share.objects.filter(
            pk=push.share_id, revoked_at__isnull=True, expires_at__gt=timezone.now()
        ).exists()
    ):
        # Revoked or expired while queued or waiting for a retry: nothing more leaves.
        Push.objects.filter(pk=push.pk).exclude(status=PushStatus.CANCELLED).update(
            status=PushStatus.FAILED,
            error="The share was revoked or has expired; nothing more was sent.",
            next_attempt_at=None,
            finished_at=timezone.now(),
        )
        push.refresh_from_db()
        return push
    claimed = Push.objects.filter(pk=push.pk).exclude(
        status__in=[PushStatus.RUNNING, PushStatus.CANCELLED]
    )
    if not claimed.update(
        status=PushStatus.RUNNING, attempts=push.attempts + 1, next_attempt_at=None
    ):
        push.refresh_from_db()
        return push  # another worker is sending it, or it was cancelled
    push.refresh_from_db()
    destination = push.destination
    items = list(
        push.items.filter(sent=False)
        .select_related("instance")
        .order_by("instance__series_id", "instance__instance_number", "instance_id")
    )
    transient = ""
    try:
        if items:
            transient = _send(destination, items)
    except PushTransient as exc:
        transient = str(exc)
    _finish(push, transient=transient)
    if transient:
        raise PushTransient(transient)
    return push


def _send(destination: PacsDestination, items: list[PushInstance]) -> str:
    """One association for all the items; returns why a retry is needed, or ""."""
    ae = _ae()
    contexts = _contexts(items)
    try:
        assoc = _associate(ae, destination, contexts=contexts)
    except OutboundRefused as exc:
        # A saved destination whose name now resolves somewhere Relay does not call.
        raise PushTransient(f"Refused to connect to {destination}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise PushTransient(f"Could not connect to {destination}: {exc}") from exc
    if not assoc.is_established:
        reason = (
            "refused the association"
            if assoc.is_rejected
            else f"did not answer{_tls_hint(destination)}"
        )
        raise PushTransient(f"{destination} {reason}")
    if hasattr(assoc, "dul") and hasattr(assoc.dul, "_run_loop_delay"):
        assoc.dul._run_loop_delay = RUN_LOOP_DELAY_S
    accepted: dict[str, set[str]] = defaultdict(set)
    for context in assoc.accepted_contexts:
        if context.abstract_syntax and context.transfer_syntax:
            accepted[context.abstract_syntax].add(context.transfer_syntax[0])
    storage = storages["default"]
    transient = ""
    checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-verify")
    checks: dict[int, Future[None]] = {}

    def check_ahead(start: int) -> None:
        """Start the checks of the files sent as stored among items[start:start+VERIFY_AHEAD]."""
        for ahead in items[start : start + VERIFY_AHEAD]:
            instance = ahead.instance
            if ahead.pk in checks or instance.transfer_syntax_uid not in accepted.get(
                instance.sop_class_uid, set()
            ):
                continue
            if _storage_path(storage, instance) is not None:
                checks[ahead.pk] = checker.submit(integrity.instance_verify, instance, storage)

    results = _Results()
    ended = False
    stack = ExitStack()
    try:
        # Unwound in reverse at the end: the answers written, the checks stopped, the reactor
        # resumed.
        stack.enter_context(_reactor_held(assoc))
        stack.callback(checker.shutdown, wait=True, cancel_futures=True)
        stack.callback(results.flush)
        for index, item in enumerate(items):
            instance = item.instance
            offered = accepted.get(instance.sop_class_uid, set())
            if _ended(assoc):
                ended = True
                transient = "The association ended"
                break
            check_ahead(index)
            try:
                if instance.transfer_syntax_uid in offered:
                    # As stored, byte for byte: pynetdicom streams the file's data set in PDU
                    # sized chunks without decoding it (flat memory, no re-encoding).
                    with _local_file(storage, instance, checked=checks.pop(item.pk, None)) as path:
                        check_ahead(index + 1)
                        status = assoc.send_c_store(path)
                    syntax = instance.transfer_syntax_uid
                elif offered & set(UNCOMPRESSED):
                    # Explicit VR where the PACS takes it: private VRs survive.
                    syntax = next(s for s in UNCOMPRESSED if s in offered)
                    with _converted(storage, instance, syntax=syntax) as path:
                        status = assoc.send_c_store(path)
                else:
                    results.add(
                        item,
                        status=None,
                        error="The PACS accepts no transfer syntax for this kind of object",
                    )
                    continue
            except integrity.IntegrityError as exc:
                # Damaged in storage: this instance fails (nothing of it was sent), the others
                # go on; audited and staff told.
                integrity.integrity_failure(instance, "push", key=exc.key, reason=exc.reason)
                results.add(
                    item, status=None, error=f"Not sent: the stored copy is damaged ({exc.reason})"
                )
                continue
            except Exception as exc:  # one bad instance must not stop the others
                if not assoc.is_established:
                    transient = f"The association ended: {exc}"
                    break
                results.add(item, status=None, error=f"{type(exc).__name__}: {exc}")
                continue
            code = getattr(status, "Status", None)
            if code is None:
                transient = "The PACS stopped answering"
                break
            ok = code == 0 or 0xB000 <= code <= 0xBFFF
            results.add(
                item,
                status=code,
                sent=ok,
                syntax=syntax,
                error="" if ok else f"Refused with status 0x{code:04X}",
            )
            if 0xA700 <= code <= 0xA7FF:
                transient = "The PACS is out of resources"
    finally:
        try:
            stack.close()
        finally:
            if ended or _ended(assoc):
                # The reactor, running again, records the abort: nothing to release then.
                _wait_until(lambda: not assoc.is_established, 1.0)
            if assoc.is_established:
                assoc.release()
    return transient


def _storage_path(storage: Storage, instance: Instance) -> str | None:
    """The stored object's path on this machine, or None (S3)."""
    try:
        return str(storage.path(instance.storage_key))
    except NotImplementedError:
        return None


def _contexts(items: list[PushInstance]) -> list[Any]:
    """The presentation contexts to propose: per SOP class, explicit and implicit little endian
    (the fallback every PACS takes), and one context per other syntax the instances are stored
    in, so that they can go as stored. Past pynetdicom's 128, the stored syntaxes of the most
    instances are kept; the others are converted."""
    from pynetdicom import build_context

    stored: Counter[tuple[str, str]] = Counter(
        (item.instance.sop_class_uid, item.instance.transfer_syntax_uid) for item in items
    )
    sop_classes = sorted({sop_class for sop_class, _ in stored})
    contexts = [build_context(sop_class, UNCOMPRESSED) for sop_class in sop_classes]
    others = sorted(
        (key for key in stored if key[1] not in UNCOMPRESSED), key=lambda key: (-stored[key], key)
    )
    contexts += [build_context(sop_class, [syntax]) for sop_class, syntax in others]
    return contexts[:MAX_CONTEXTS]


@contextmanager
def _local_file(
    storage: Storage, instance: Instance, *, checked: Future[None] | None = None
) -> Iterator[Path]:
    """A path to the stored object, checked against its SHA-256 and size first
    (integrity.IntegrityError): the file itself on disk, else a temporary copy (S3), checked
    as it is copied. `checked`: that check of the file on disk, already started (its result is
    waited for here, before anything is sent)."""
    local = _storage_path(storage, instance)
    if local is not None:
        # pynetdicom reads the file itself once the C-STORE starts, too late to stop a damaged
        # one: it is read and checked here first (a second read, mostly from the page cache).
        if checked is not None:
            checked.result()
        else:
            integrity.instance_verify(instance, storage)
        yield Path(local)
        return
    with (
        tempfile.NamedTemporaryFile(suffix=".dcm") as copy,
        integrity.instance_open(instance, storage) as f,
    ):
        shutil.copyfileobj(f, copy, 1024 * 1024)
        f.verify()
        copy.flush()
        yield Path(copy.name)


@contextmanager
def _converted(storage: Storage, instance: Instance, *, syntax: str) -> Iterator[Path]:
    """The instance decompressed or re-encoded little endian (`convert`), in exactly `syntax`,
    as a temporary file that pynetdicom streams; the stored copy checked before any of it is
    sent (integrity.IntegrityError)."""
    with integrity.instance_open(instance, storage) as f:
        # Bounded: a deflated copy is inflated as a stream, never past the cap.
        with dicomio.dataset_open(cast(IO[bytes], f)) as (ds, _):
            pass
        f.verify()
    copy = converted_copy(ds, syntax=syntax)
    del ds  # only the file is sent: the decoded data set need not stay in memory meanwhile
    with copy as path:
        yield path


class _Results:
    """The answers of a run, one row per instance as they come, written in one transaction every
    RECORD_EVERY_S and at the end (`flush`): a commit per instance cost more than sending some
    instances. A worker killed mid-run loses at most that many answers: those instances count as
    not sent and go again on the next run."""

    def __init__(self) -> None:
        self.pending: list[PushInstance] = []
        self.since = time.monotonic()

    def add(
        self,
        item: PushInstance,
        *,
        status: int | None,
        error: str = "",
        sent: bool = False,
        syntax: str = "",
    ) -> None:
        item.status, item.sent, item.error, item.at = status, sent, error[:300], timezone.now()
        item.transfer_syntax_uid = syntax
        self.pending.append(item)
        if time.monotonic() - self.since >= RECORD_EVERY_S:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.since = time.monotonic()
        if not pending:
            return
        with transaction.atomic():
            for item in pending:
                # A row each, as answered (bulk_update's CASE expressions cost more to build).
                item.save(update_fields=["status", "sent", "error", "at", "transfer_syntax_uid"])
                if item.sent:
                    _delivered(item)


def _delivered(item: PushInstance) -> None:
    push = item.push
    if push.share_id is not None and (share := push.share) is not None:
        # A study pushed under a share is delivered to the facility that owns the PACS, one
        # usage record per instance accepted (keyed by the item, so a retry cannot add one).
        delivery_announce(
            kind=DeliveryKind.PUSH,
            share=share,
            study=push.study,
            user=push.requested_by,
            nbytes=item.instance.size_bytes,
            images=1,
            key_parts=(item.pk,),
            to_facility=push.destination.facility,
        )


def _finish(push: Push, *, transient: str) -> None:
    counts = push.items.aggregate(
        n_sent=Count("pk", filter=Q(sent=True)), n_failed=Count("pk", filter=Q(sent=False))
    )
    sent, failed = counts["n_sent"], counts["n_failed"]
    if failed == 0:
        status = PushStatus.DONE
    elif transient:
        status = PushStatus.QUEUED  # the retry will send the rest
    elif sent:
        status = PushStatus.PARTIAL
    else:
        status = PushStatus.FAILED
    if status == PushStatus.QUEUED:
        metrics.PUSH_ATTEMPTS_FAILED.inc()
    else:
        metrics.PUSHES_FINISHED.labels(outcome=status.value).inc()
    with transaction.atomic():
        Push.objects.filter(pk=push.pk).update(
            status=status,
            sent=sent,
            failed=failed,
            error=transient[:300],
            finished_at=None if status == PushStatus.QUEUED else timezone.now(),
        )
        if push.share_id is not None and status != PushStatus.QUEUED and sent:
            ShareEvent.objects.create(
                share_id=push.share_id,
                kind=ShareEventKind.IMPORTED,
                actor_label=push.requested_by.email,
                detail=f"{sent} of {sent + failed} images into {push.destination.name}",
            )
    push.refresh_from_db()


def pushes_give_up(*, push: Push, reason: str) -> None:
    """The task ran out of retries: the push is failed, with the last reason, for the user."""
    metrics.PUSHES_FINISHED.labels(outcome=PushStatus.FAILED.value).inc()
    Push.objects.filter(pk=push.pk).exclude(status=PushStatus.CANCELLED).update(
        status=PushStatus.FAILED,
        error=reason[:300],
        next_attempt_at=None,
        next_attempt=0,
        finished_at=timezone.now(),
    )
