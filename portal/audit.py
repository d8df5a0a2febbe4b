"""Writing the audit trail.

`audit_record` is the one way an event is written (`audit_event` builds one unsaved, for ingest,
which inserts it with the rows it concerns). Each event names two facilities: the one whose data
or settings it concerns (`facility`) and the one the person acted for (`actor_facility`, such as
the recipient facility of a share); the admins of both read it on their audit log. The
receivers at the bottom exist because Django reports logins, logouts and failed logins (including
the admin's) only through signals.

Reading it: `audit_events_for` is what a facility's admin may see (their page and its CSV/JSON
export), `audit_export_stream` streams it a batch at a time, and the `audit_search_*` functions
keep an admin's filter (which may name a patient) in their session instead of in the URL."""

from __future__ import annotations

import csv
import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, ParamSpec, Protocol

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models import Q, QuerySet
from django.dispatch import receiver
from django.http import Http404, HttpRequest
from django.utils import timezone

from .access import AuthedRequest, acting_facility, get_membership_for_user
from .models import AuditAction, AuditEvent, Facility, Membership, Outcome, User

P = ParamSpec("P")


class AuditedStudy(Protocol):
    """What the trail copies from a study (transfers' Study has it; portal does not import it)."""

    study_instance_uid: str
    patient_id: str

    @property
    def facility(self) -> Facility: ...


def client_ip(request: HttpRequest | None, address: str | None = None) -> str | None:
    """The client's IP address: the request's, or `address` (a DICOM peer's) without one."""
    # REMOTE_ADDR is what the server saw; behind the TLS proxy relay.proxy has replaced the
    # proxy's address with the client's (RELAY_TRUSTED_PROXIES).
    raw = request.META.get("REMOTE_ADDR", "") if request is not None else (address or "")
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        return None


def audit_event(
    *,
    action: str,
    request: HttpRequest | None = None,
    actor: User | None = None,
    facility: Facility | None = None,
    actor_facility: Facility | None = None,
    study: AuditedStudy | None = None,
    study_instance_uid: str = "",
    patient_id: str = "",
    outcome: str = Outcome.SUCCESS,
    detail: dict[str, Any] | None = None,
    address: str | None = None,
) -> AuditEvent:
    """The event `audit_record` writes, not saved yet: for a caller that inserts it together
    with other rows (ingest writes an upload's event in the statement that stores its rows)."""
    # Refuses a misspelt or unknown action: the trail is searched by these values.
    action = AuditAction(action).value
    if actor is None and request is not None and getattr(request, "user", None) is not None:
        if request.user.is_authenticated:
            actor = request.user  # type: ignore[assignment]
    if study is not None:
        study_instance_uid = study.study_instance_uid
        patient_id = study.patient_id
        facility = facility or study.facility
    if actor_facility is None and actor is not None:
        # A caller that knows better (the recipient facility of the share used) passes it.
        actor_facility = acting_facility(actor, facility)
    return AuditEvent(
        action=action,
        outcome=outcome,
        actor=actor,
        actor_email=actor.email if actor else (detail or {}).get("email", ""),
        facility=facility,
        actor_facility=actor_facility,
        study_instance_uid=study_instance_uid,
        patient_id=patient_id[:64],
        client_ip=client_ip(request, address),
        user_agent=(request.META.get("HTTP_USER_AGENT", "")[:300] if request is not None else ""),
        detail=detail or {},
    )


def _saved(make: Callable[P, AuditEvent]) -> Callable[P, AuditEvent]:
    def record(*args: P.args, **kwargs: P.kwargs) -> AuditEvent:
        event = make(*args, **kwargs)
        event.save(force_insert=True)
        return event

    record.__doc__ = "Write one event now: `audit_event`'s event, saved as a new row."
    return record


audit_record = _saved(audit_event)


# --- reading the trail: a facility admin's log and its export -----------------------------------


def audit_admin_membership(request: AuthedRequest, slug: str, *, page: str) -> Membership:
    """The signed-in admin's membership of facility `slug`; anyone else gets the same 404 as
    for a facility that does not exist, and the refusal is audited (to that facility, when it
    exists, so that its admins see who tried to read their trail)."""
    try:
        return get_membership_for_user(request, slug, manage=True)
    except Http404:
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            request=request,
            facility=Facility.objects.filter(slug=slug).first(),
            outcome=Outcome.FAILURE,
            detail={"reason": "not an admin of the facility", "page": page},
        )
        raise


def audit_events_for(
    facility: Facility, filters: dict[str, Any] | None = None
) -> QuerySet[AuditEvent]:
    """The events a facility's admins read: those about its data and settings, and those of
    its people acting for it elsewhere (opening, downloading or pushing a study another facility
    shared with it). `filters` are an AuditFilterForm's cleaned data.

    A failed attempt of one of its people on another facility's study (refused: not shared with
    them) keeps that study's patient ID and UID to the facility holding it: they are not shown
    here (see `audit_patient_shown`) and a search by patient does not find it."""
    events = AuditEvent.objects.filter(Q(facility=facility) | Q(actor_facility=facility))
    events = events.select_related("facility", "actor_facility")
    data = filters or {}
    if data.get("action"):
        events = events.filter(action=data["action"])
    if data.get("outcome"):
        events = events.filter(outcome=data["outcome"])
    if data.get("who"):
        events = events.filter(actor_email__iexact=data["who"].strip())
    patient_id = (data.get("patient_id") or "").strip()
    study_uid = (data.get("study_uid") or "").strip()
    if patient_id or study_uid:
        events = events.filter(_patient_shown(facility))
        if patient_id:
            events = events.filter(patient_id=patient_id)
        if study_uid:
            events = events.filter(study_instance_uid=study_uid)
    tz = timezone.get_current_timezone()
    if data.get("date_from"):
        events = events.filter(at__gte=datetime.combine(data["date_from"], datetime.min.time(), tz))
    if data.get("date_to"):
        events = events.filter(at__lte=datetime.combine(data["date_to"], datetime.max.time(), tz))
    return events.order_by("-at", "-id")


def _patient_shown(facility: Facility) -> Q:
    return Q(facility=facility) | Q(facility__isnull=True) | Q(outcome=Outcome.SUCCESS)


def audit_patient_shown(event: AuditEvent, facility: Facility) -> bool:
    """Whether `facility`'s admins may read the patient of `event` (see `audit_events_for`)."""
    return (
        event.facility_id is None
        or event.facility_id == facility.pk
        or event.outcome == Outcome.SUCCESS
    )


def audit_side(event: AuditEvent, facility: Facility) -> str:
    """Which side of the event `facility` is on: "holder" (its data, someone of another facility
    acted), "actor" (one of its people, another facility's data) or "own"."""
    if event.facility_id == facility.pk and event.actor_facility_id not in (None, facility.pk):
        return "holder"
    if event.actor_facility_id == facility.pk and event.facility_id not in (None, facility.pk):
        return "actor"
    return "own"


@dataclass(frozen=True)
class AuditRow:
    """One event as a facility's admin reads it on the page."""

    event: AuditEvent
    side: str
    patient_shown: bool
    detail: list[tuple[str, str]]


def audit_row(event: AuditEvent, facility: Facility) -> AuditRow:
    return AuditRow(
        event=event,
        side=audit_side(event, facility),
        patient_shown=audit_patient_shown(event, facility),
        detail=_detail_items(event.detail),
    )


def _detail_items(detail: dict[str, Any]) -> list[tuple[str, str]]:
    """The detail as short "key: value" texts; a change's before and after values as
    "field=value, ..." (None, for a thing added or removed, is left out)."""
    items = []
    for key, value in detail.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        if isinstance(value, dict):
            text = ", ".join(f"{field}={item}" for field, item in value.items())
        else:
            text = str(value)
        items.append((key, text))
    return items


EXPORT_FIELDS = (
    "at",
    "side",
    "facility",
    "actor_facility",
    "actor_email",
    "action",
    "action_label",
    "outcome",
    "patient_id",
    "study_instance_uid",
    "client_ip",
    "user_agent",
    "detail",
)
EXPORT_BATCH = 500


def _batches(events: QuerySet[AuditEvent], size: int) -> Iterator[AuditEvent]:
    """Every event of `events` (ordered newest first), read `size` at a time by keyset: memory
    stays flat however long the trail, and no cursor is held open while a slow client reads."""
    last: AuditEvent | None = None
    while True:
        batch = events
        if last is not None:
            batch = batch.filter(Q(at__lt=last.at) | Q(at=last.at, id__lt=last.pk))
        rows = list(batch[:size])
        yield from rows
        if len(rows) < size:
            return
        last = rows[-1]


def _export_row(event: AuditEvent, facility: Facility) -> dict[str, Any]:
    shown = audit_patient_shown(event, facility)
    return {
        "at": event.at.isoformat(),
        "side": audit_side(event, facility),
        "facility": event.facility.name if event.facility else "",
        "actor_facility": event.actor_facility.name if event.actor_facility else "",
        "actor_email": event.actor_email,
        "action": event.action,
        "action_label": event.action_label,
        "outcome": event.outcome,
        "patient_id": event.patient_id if shown else "",
        "study_instance_uid": event.study_instance_uid if shown else "",
        "client_ip": event.client_ip or "",
        "user_agent": event.user_agent,
        "detail": event.detail,
    }


def csv_safe(value: str) -> str:
    """A cell a spreadsheet will not run as a formula (CSV injection): one starting with = + - @
    (or a tab or carriage return) gets a leading apostrophe."""
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value


class _Line:
    """A file-like object whose write returns what was written, for csv.writer."""

    def write(self, value: str) -> str:
        return value


def audit_export_stream(
    events: QuerySet[AuditEvent], facility: Facility, fmt: str, *, batch: int = EXPORT_BATCH
) -> Iterable[str]:
    """The events as CSV (a header, then one line per event) or as a JSON array, produced a
    batch at a time for a StreamingHttpResponse."""
    rows = (_export_row(event, facility) for event in _batches(events, batch))
    if fmt == "json":
        return _json_lines(rows)
    return _csv_lines(rows)


def _csv_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    writer = csv.writer(_Line())
    yield writer.writerow(EXPORT_FIELDS)
    for row in rows:
        row["detail"] = json.dumps(row["detail"], sort_keys=True, default=str)
        yield writer.writerow([csv_safe(str(row[name])) for name in EXPORT_FIELDS])


def _json_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    yield "["
    for n, row in enumerate(rows):
        yield ("," if n else "") + "\n" + json.dumps(row, default=str)
    yield "\n]\n"


# --- saved searches: the filter of the audit page kept in the session, not in the URL ---------

SEARCH_SESSION_KEY = "audit_searches"
SEARCH_SECONDS = 60 * 60
SEARCH_KEEP = 10


def audit_search_save(request: HttpRequest, facility: Facility, data: dict[str, str]) -> str:
    """Keep a filter (the form's raw values) in the session for an hour; returns the short key
    the page's URL carries instead of the values (a patient ID must not sit in browser history,
    proxy logs or a Referer header)."""
    now = time.time()
    saved = {
        key: value
        for key, value in request.session.get(SEARCH_SESSION_KEY, {}).items()
        if value.get("until", 0) > now
    }
    key = secrets.token_urlsafe(9)
    saved[key] = {"facility": facility.pk, "data": data, "until": now + SEARCH_SECONDS}
    # Only the newest few: the session stays small.
    newest = sorted(saved.items(), key=lambda item: item[1]["until"])[-SEARCH_KEEP:]
    request.session[SEARCH_SESSION_KEY] = dict(newest)
    return key


def audit_search_load(request: HttpRequest, facility: Facility, key: str) -> dict[str, str] | None:
    """The filter saved under `key` for this facility, or None (unknown, another facility's,
    or expired)."""
    found = request.session.get(SEARCH_SESSION_KEY, {}).get(key)
    if not found or found.get("facility") != facility.pk or found.get("until", 0) <= time.time():
        return None
    return dict(found["data"])


def audit_filters_describe(data: dict[str, Any]) -> dict[str, str]:
    """The filters of an export for its own audit event, without the patient ID and study UID
    (those go in the event's own columns, where the trail keeps which patient)."""
    described = {}
    for name, value in data.items():
        if name in ("patient_id", "study_uid") or value in (None, ""):
            continue
        described[name] = value.isoformat() if isinstance(value, date) else str(value)
    return described


@receiver(user_logged_in)
def _on_login(sender: Any, request: HttpRequest, user: User, **kwargs: Any) -> None:
    audit_record(action=AuditAction.LOGIN, request=request, actor=user)


@receiver(user_logged_out)
def _on_logout(sender: Any, request: HttpRequest, user: User | None, **kwargs: Any) -> None:
    if user is not None:
        audit_record(action=AuditAction.LOGOUT, request=request, actor=user)


@receiver(user_login_failed)
def _on_login_failed(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    # The attempted address is kept (it is what an investigator searches for); never the password.
    email = str(credentials.get("username") or credentials.get("email") or "")[:254]
    audit_record(
        action=AuditAction.LOGIN_FAILED,
        request=request,
        outcome=Outcome.FAILURE,
        detail={"email": email},
    )
