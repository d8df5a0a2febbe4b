"""The DICOM gateway: a facility's PACS sends studies to Relay with C-STORE.

One listening port serves every facility, and a second one with DICOM TLS when Relay has a
certificate (transfers/dicom/tls.py). A PACS calls the gateway by its facility's own AE title
(Facility.ae_title); that title decides whose studies the images become. Access is deny by
default: the caller's AE title must be one the facility's admin listed, and it must come from a
listed address or network, or present a listed client certificate on the TLS port; a facility
may also refuse anything but TLS. Everything else is refused at association, before a byte of
patient data arrives. Every refusal (a failed TLS handshake too) is audited (DICOM_REFUSED, to
the called facility when there is one: its admins see who knocked), before the answer goes out;
only when the database itself is unreachable is it logged alone.

Received instances are written to a spool file as their PDUs arrive (pynetdicom's
STORE_RECV_CHUNKED_DATASET), never held whole in memory: the gateway's memory stays flat in
instance size, with up to 20 associations at once.

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

The same admitted associations may also query and retrieve (C-FIND, C-MOVE, C-GET: query.py,
retrieve.py) what the calling facility may see, and ask for storage commitment (commitment.py).
This module only wires them: the presentation contexts and the handlers. Storage contexts
accept both roles, so that a C-GET requestor (which proposes to be the Storage SCP) can be sent
to on its own association; a sender proposing no role is unaffected.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connections
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID_dictionary
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
    register_uid,
)
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from portal.audit import audit_record
from portal.models import AuditAction, Facility, Outcome

from ..ingest import CHUNK, CONFLICT, DUPLICATE, STORED, UNAVAILABLE, instance_ingest
from ..models import Study
from . import commitment, query, retrieve
from .caller import Caller
from .net import tcp_nodelay_enable
from .tls import fingerprint, gateway_context

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
COMPOSITE_STORAGE = "1.2.840.10008.5.1.4.1.1."
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
# A sender that opens the TLS port and says nothing is dropped after this many seconds.
HANDSHAKE_TIMEOUT_S = 30


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


def caller_admit(
    *,
    called_ae: str,
    calling_ae: str,
    address: str,
    tls: bool = False,
    certificate: str = "",
) -> Caller | Refusal:
    """The facility an association may store into, or why it is refused.

    `tls` says the association came over the TLS port; `certificate` is the SHA-256 fingerprint
    of the client certificate the sender presented there (already checked against the CAs the
    operator trusts), or "".
    """
    called, calling = called_ae.strip(), calling_ae.strip()
    facility = Facility.objects.filter(ae_title=called).first()
    if facility is None:
        return Refusal(f"no facility has the AE title {called!r}", REJECT_CALLED_AE)
    calling_list = _allowed(facility.gateway_calling_aes)
    if not calling_list:
        return Refusal(
            f"{facility.slug} allows no calling AE title yet", REJECT_CALLING_AE, facility
        )
    if calling not in calling_list:
        return Refusal(
            f"calling AE {calling!r} is not allowed for {facility.slug}",
            REJECT_CALLING_AE,
            facility,
        )
    if facility.gateway_tls_required and not tls:
        return Refusal(f"{facility.slug} accepts senders over TLS only", REJECT_NO_REASON, facility)
    certificates = _allowed(facility.gateway_client_certificates)
    by_certificate = bool(certificate) and certificate in certificates
    if not by_certificate and not _address_allowed(address, _allowed(facility.gateway_addresses)):
        presented = " with an unlisted client certificate" if certificate else ""
        return Refusal(
            f"address {address}{presented} is not allowed for {facility.slug}",
            REJECT_NO_REASON,
            facility,
        )
    return Caller(facility=facility, calling_ae=calling, address=address, tls=tls)


def extra_storage_classes() -> list[str]:
    """Storage SOP classes beyond pynetdicom's current list: every retired composite storage
    class in pydicom's dictionary, Siemens' CSA Non-Image, and DICOM_GATEWAY_EXTRA_SOP_CLASSES.
    Each is registered with pynetdicom as a storage class, so C-STORE reaches our handler."""
    retired = [
        uid
        for uid, (_, kind, _, status, _) in UID_dictionary.items()
        if kind == "SOP Class" and status == "Retired" and uid.startswith(COMPOSITE_STORAGE)
    ]
    uids = [*retired, SIEMENS_CSA_NON_IMAGE, *settings.DICOM_GATEWAY_EXTRA_SOP_CLASSES]
    known = set(_STORAGE_CLASSES.values())
    for uid in uids:
        if uid not in known:
            register_uid(uid, "RelayStorage" + uid.replace(".", "_"), StorageServiceClass)
            known.add(uid)
    return list(dict.fromkeys(uids))


def _prefer_senders_order(assoc: Any) -> None:
    """Accept, in each presentation context, the first transfer syntax the sender proposed that
    Relay reads (pynetdicom takes the first in its own list, implicit little endian: a sender
    that offered [JPEG-LS, explicit, implicit] would decompress, and lose private VRs)."""
    request = assoc.requestor.primitive
    wanted: dict[str, list[str]] = {}
    for proposed in request.presentation_context_definition_list:
        wanted.setdefault(
            str(proposed.abstract_syntax), [str(ts) for ts in proposed.transfer_syntax]
        )
    contexts = []
    for context in assoc.acceptor.supported_contexts:
        order = wanted.get(str(context.abstract_syntax))
        if order:
            ours = [str(ts) for ts in context.transfer_syntax]
            context.transfer_syntax = [ts for ts in order if ts in ours] + [
                ts for ts in ours if ts not in order
            ]
        contexts.append(context)
    assoc.acceptor.supported_contexts = contexts


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved into the connection's own
    thread, under a time limit: in pynetdicom's accept loop, one sender that connects and stays
    silent would keep every other sender out."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None and self.ssl_context is not None
        client, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(
            client, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        assert isinstance(request, ssl.SSLSocket)
        timeout = request.gettimeout()
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            request.do_handshake()
            request.settimeout(timeout)
        except (OSError, ValueError) as exc:
            _handshake_failure_audit(exc, address=str(client_address[0]))
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def _handshake_failure_audit(exc: BaseException, *, address: str) -> None:
    """A refused TLS handshake (no or an untrusted certificate, an old protocol) is a refusal
    like any other; a connection closed or timed out before any handshake (a port check, a load
    balancer's probe) is only logged."""
    log.warning("gateway: TLS handshake from %s failed: %s", address, exc)
    if not isinstance(exc, ssl.SSLError) or isinstance(exc, ssl.SSLEOFError):
        return
    close_old_connections()
    _refusal_audit(
        Refusal(
            f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"[:200], REJECT_NO_REASON
        ),
        called_ae="",
        calling_ae="",
        address=address,
    )
    connections.close_all()


def _peer_certificate(assoc: Any) -> tuple[bool, str]:
    """Whether the association came over TLS, and its client certificate's fingerprint."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return False, ""
    der = sock.getpeercert(binary_form=True)
    return True, (fingerprint(der) if der else "")


class Gateway:
    """The C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET and Storage Commitment service provider. `start()` listens in background threads."""

    def __init__(self, *, ae_title: str | None = None) -> None:
        tcp_nodelay_enable()
        # Each received instance goes to a spool file as it arrives, not into memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.ae = AE(ae_title=ae_title or settings.DICOM_GATEWAY_AE_TITLE)
        # Whatever the sender's transfer syntax, the file is kept as it came: never recompressed.
        # Both roles: a sender's C-STORE (no role selection: Relay is the SCP) and C-GET, whose
        # requestor proposes to be the Storage SCP (Relay then sends on the same association).
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                self.ae.add_supported_context(
                    context.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
                )
        # Retired and private storage classes that PACS still send (old ultrasound and nuclear
        # medicine, Siemens' CSA non-image objects...), as the HTTP API accepts them.
        for uid in extra_storage_classes():
            self.ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        self.ae.add_supported_context(VERIFICATION)
        # Query/retrieve (transfers/dicom/query.py, retrieve.py) and storage commitment
        # (commitment.py), for what the calling facility may see.
        for uid in query.QUERY_RETRIEVE_CLASSES:
            self.ae.add_supported_context(uid)
        self.ae.add_supported_context(commitment.STORAGE_COMMITMENT)
        self.ae.maximum_associations = 20
        self.callers: dict[int, Caller] = {}
        self.marked: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self.handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_N_ACTION, self._on_commit),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]

    def start(
        self, *, host: str, port: int, tls_context: ssl.SSLContext | None = None
    ) -> ThreadedAssociationServer:
        """Listen in background threads; with a TLS context, this port speaks DICOM TLS."""
        if tls_context is None:
            server = self.ae.start_server((host, port), block=False, evt_handlers=self.handlers)
            assert isinstance(server, ThreadedAssociationServer)
            return server
        tls_server = self.ae.make_server(
            (host, port),
            ssl_context=tls_context,
            evt_handlers=self.handlers,
            server_class=TlsAssociationServer,
        )
        thread = threading.Thread(
            target=tls_server.serve_forever, name=f"GatewayTLS@{port}", daemon=True
        )
        thread.start()
        self.ae._servers.append(tls_server)
        return tls_server

    def serve_forever(self, *, host: str, port: int, tls_port: int | None = None) -> None:
        """Listen on `port`, and with TLS on `tls_port` when Relay has a certificate, until
        interrupted."""
        servers = [self.start(host=host, port=port)]
        context = gateway_context()
        if context is not None and tls_port:
            servers.append(self.start(host=host, port=tls_port, tls_context=context))
        try:
            while True:
                time.sleep(3600)
        finally:
            for server in servers:
                server.shutdown()

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
                tls, certificate = _peer_certificate(assoc)
                caller = caller_admit(
                    called_ae=called,
                    calling_ae=calling,
                    address=address,
                    tls=tls,
                    certificate=certificate,
                )
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
        _prefer_senders_order(assoc)
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
            path = Path(event.dataset_path)
            meta, offset = _file_meta(path, source_ae=caller.calling_ae)
            size = len(meta) + path.stat().st_size - offset
        except Exception as exc:
            log.exception("gateway: could not take an instance from %s", caller.source)
            return _status(OUT_OF_RESOURCES, f"{type(exc).__name__}")
        result = instance_ingest(
            facility=caller.facility,
            user=None,
            chunks=_file_chunks(path, meta, offset),
            expected_size=size,
            filename=f"C-STORE from {caller.calling_ae}",
            source=caller.source,
            # The meta names the sender: the same data set from another AE title is no conflict.
            meta_may_differ=True,
        )
        if result.status in (STORED, DUPLICATE):
            self._mark_source(event.assoc, caller, result.study_uuid)
            return _status(SUCCESS)
        if result.status == UNAVAILABLE:
            return _status(OUT_OF_RESOURCES, result.reason)
        if result.status == CONFLICT:
            return _status(DOES_NOT_MATCH, result.reason)
        return _status(CANNOT_UNDERSTAND, result.reason)

    def _caller(self, event: Any) -> Caller | None:
        with self._lock:
            caller = self.callers.get(id(event.assoc))
        # A connection broken while the database was down is replaced rather than reused.
        close_old_connections()
        return caller

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        caller = self._caller(event)
        if caller is None:  # cannot happen: associations are admitted first
            return iter([(OUT_OF_RESOURCES, None)])
        return query.find_answers(caller, event)

    def _on_move(self, event: Any) -> Iterator[Any]:
        caller = self._caller(event)
        if caller is None:
            return iter([(None, None)])
        return retrieve.move_answers(caller, event)

    def _on_get(self, event: Any) -> Iterator[Any]:
        caller = self._caller(event)
        if caller is None:
            return iter([0])
        return retrieve.get_answers(caller, event)

    def _on_commit(self, event: Any) -> tuple[int, Dataset | None]:
        caller = self._caller(event)
        if caller is None:
            return commitment.PROCESSING_FAILURE, None
        return commitment.action_answer(caller, event)

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


def _file_meta(path: Path, *, source_ae: str) -> tuple[bytes, int]:
    """The preamble, prefix and file meta of the instance as Relay stores it: pynetdicom's, with
    the Source Application Entity Title (0002,0016) of the sender (PS3.10 7.1); and where the
    data set starts in pynetdicom's spool file."""
    meta = read_file_meta_info(path)
    offset = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    meta.SourceApplicationEntityTitle = source_ae[:16]
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue(), offset


def _file_chunks(path: Path, meta: bytes, offset: int) -> Iterator[bytes]:
    """Relay's file meta, then the data set as the sender sent it (pynetdicom's spool file from
    `offset`), in chunks."""
    yield meta
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            yield chunk


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
