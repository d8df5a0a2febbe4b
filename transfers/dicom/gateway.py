"""The DICOM gateway: a facility's PACS sends studies to Relay with C-STORE.

One listening port serves every facility. A PACS calls the gateway by its facility's own AE title
(Facility.ae_title); that title decides whose studies the images become. A facility may also
list the calling AE titles and IP addresses allowed to use its title; anything else is refused
at association, before a byte of patient data arrives. Every refusal is audited (DICOM_REFUSED,
to the called facility when there is one: its admins see who knocked), before the answer goes
out; only when the database itself is unreachable is it logged alone.

Each received instance goes through `instance_ingest`, exactly like an upload: same checks,
same deduplication, same audit. The answer to the sender follows the ingest result:

- stored or already stored with the same bytes: Success (0x0000);
- refused (not DICOM, no SOP Instance UID, too deep...): 0xC000 "cannot understand", with the
  reason in Error Comment; the association goes on with the next instance;
- the same SOP Instance UID already stored with other bytes: 0xA900 "data set does not match";
- storage or database unreachable: 0xA700 "out of resources", which senders retry. Nothing is
  acknowledged before its rows are committed, so nothing acknowledged is ever lost.

A study received this way has no manifest; it is complete after the quiet period
(RELAY_STUDY_QUIET_SECONDS) with no new instances, as the sharing rules describe.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connections
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from portal.audit import audit_record
from portal.models import AuditAction, Facility, Outcome

from ..ingest import CONFLICT, DUPLICATE, STORED, UNAVAILABLE, instance_ingest
from ..models import Study
from .net import tcp_nodelay_enable

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH = 0xA900
OUT_OF_RESOURCES = 0xA700

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_BUSY = (0x02, 0x03, 0x01)
REJECT_LIMIT = (0x02, 0x03, 0x02)


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of one association, once it was let in."""

    # Read once, at association: one query fewer per instance (a PACS sends hundreds, one
    # after the other, each waiting for its answer).
    facility: Facility
    calling_ae: str
    address: str

    @property
    def source(self) -> str:
        return f"dicom:{self.calling_ae}@{self.address}"


def _allowed(listing: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", listing.strip()) if item]


def _address_allowed(address: str, listing: list[str]) -> bool:
    """An address matches a listed address or network (CIDR)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for item in listing:
        try:
            if ip in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            continue
    return False


@dataclass(frozen=True)
class Refusal:
    reason: str
    code: tuple[int, int, int]
    # The facility whose AE title was called, when one has it.
    facility: Facility | None = None


def caller_admit(*, called_ae: str, calling_ae: str, address: str) -> Caller | Refusal:
    """The facility an association may store into, or why it is refused."""
    facility = Facility.objects.filter(ae_title=called_ae.strip()).first()
    if facility is None:
        return Refusal(f"no facility has the AE title {called_ae.strip()!r}", REJECT_CALLED_AE)
    calling_list = _allowed(facility.gateway_calling_aes)
    if calling_list and calling_ae.strip() not in calling_list:
        return Refusal(
            f"calling AE {calling_ae.strip()!r} is not allowed for {facility.slug}",
            REJECT_CALLING_AE,
            facility,
        )
    address_list = _allowed(facility.gateway_addresses)
    if address_list and not _address_allowed(address, address_list):
        return Refusal(
            f"address {address} is not allowed for {facility.slug}", REJECT_NO_REASON, facility
        )
    return Caller(
        facility=facility,
        calling_ae=calling_ae.strip(),
        address=address,
    )


class Gateway:
    """The C-ECHO / C-STORE service provider. `start()` listens in background threads."""

    def __init__(self, *, ae_title: str | None = None) -> None:
        tcp_nodelay_enable()
        self.ae = AE(ae_title=ae_title or settings.DICOM_GATEWAY_AE_TITLE)
        # Whatever the sender's transfer syntax, the file is kept as it came: never recompressed.
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(VERIFICATION)
        self.ae.maximum_associations = 20
        self.callers: dict[int, Caller] = {}
        self.marked: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self.handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]

    def start(self, *, host: str, port: int) -> ThreadedAssociationServer:
        server = self.ae.start_server((host, port), block=False, evt_handlers=self.handlers)
        assert isinstance(server, ThreadedAssociationServer)
        return server

    def serve_forever(self, *, host: str, port: int) -> None:
        self.ae.start_server((host, port), block=True, evt_handlers=self.handlers)

    # --- events -------------------------------------------------------------------------------

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        called = _ae_text(request.called_ae_title)
        calling = _ae_text(request.calling_ae_title)
        address = assoc.requestor.address
        close_old_connections()
        caller: Caller | Refusal
        try:
            if self._too_many():
                # pynetdicom would refuse it right after this handler, unaudited: refuse it here.
                called_facility = Facility.objects.filter(ae_title=called).first()
                caller = Refusal("too many associations at once", REJECT_LIMIT, called_facility)
            else:
                caller = caller_admit(called_ae=called, calling_ae=calling, address=address)
        except Exception:
            # The database is unreachable: a transient refusal, so the sender tries again later.
            log.exception("gateway: could not check association from %s@%s", calling, address)
            _reject(assoc, REJECT_BUSY)
            return
        if isinstance(caller, Refusal):
            log.warning(
                "gateway: refused %s@%s calling %s: %s", calling, address, called, caller.reason
            )
            _refusal_audit(caller, called_ae=called, calling_ae=calling, address=address)
            _reject(assoc, caller.code)
            # No EVT_RELEASED follows a refusal: this thread's connection is closed here.
            connections.close_all()
            return
        with self._lock:
            self.callers[id(assoc)] = caller
        log.info("gateway: %s@%s -> %s", calling, address, caller.facility.slug)

    def _too_many(self) -> bool:
        # The same count pynetdicom makes (it includes the association being negotiated).
        acceptors = [assoc for assoc in self.ae.active_associations if assoc.is_acceptor]
        return len(acceptors) > self.ae.maximum_associations

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_store(self, event: Any) -> Dataset:
        with self._lock:
            caller = self.callers.get(id(event.assoc))
        if caller is None:  # cannot happen: associations are admitted first
            return _status(OUT_OF_RESOURCES, "association not admitted")
        # A connection broken while the database was down is replaced rather than reused.
        close_old_connections()
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.exception("gateway: could not take an instance from %s", caller.source)
            return _status(OUT_OF_RESOURCES, f"{type(exc).__name__}")
        result = instance_ingest(
            facility=caller.facility,
            user=None,
            chunks=[data],
            filename=f"C-STORE from {caller.calling_ae}",
            source=caller.source,
        )
        if result.status in (STORED, DUPLICATE):
            self._mark_source(event.assoc, caller, result.study_uuid)
            return _status(SUCCESS)
        if result.status == UNAVAILABLE:
            return _status(OUT_OF_RESOURCES, result.reason)
        if result.status == CONFLICT:
            return _status(DOES_NOT_MATCH, result.reason)
        return _status(CANNOT_UNDERSTAND, result.reason)

    def _mark_source(self, assoc: Any, caller: Caller, study_uuid: str) -> None:
        """Remember which PACS sent the study (for routing rules): once per study and association."""
        key = (id(assoc), study_uuid)
        with self._lock:
            if key in self.marked:
                return
            self.marked.add(key)
        Study.objects.filter(uuid=study_uuid, received_from_ae="").update(
            received_from_ae=caller.calling_ae
        )

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            self.callers.pop(id(event.assoc), None)
            self.marked = {key for key in self.marked if key[0] != id(event.assoc)}
        # Each association runs in its own thread with its own database connection.
        connections.close_all()


def _refusal_audit(refusal: Refusal, *, called_ae: str, calling_ae: str, address: str) -> None:
    """The refused association in the audit trail. Written before the A-ASSOCIATE-RJ goes out;
    if the database fails here the refusal still goes out (and the log has it)."""
    try:
        audit_record(
            action=AuditAction.DICOM_REFUSED,
            facility=refusal.facility,
            outcome=Outcome.FAILURE,
            address=address,
            detail={
                "calling_ae": calling_ae[:16],
                "called_ae": called_ae[:16],
                "address": address,
                "reason": refusal.reason,
            },
        )
    except Exception:
        log.exception("gateway: could not audit the refusal of %s@%s", calling_ae, address)


def _reject(assoc: Any, code: tuple[int, int, int]) -> None:
    assoc.acse.send_reject(*code)
    # As pynetdicom does for its own refusals: stopping the upper layer waits until the
    # A-ASSOCIATE-RJ has gone out, before the socket is closed.
    assoc.kill()


def _ae_text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.strip()


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        # Error Comment is LO: at most 64 characters.
        status.ErrorComment = comment[:64]
    return status
