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
instance size, with up to 20 associations at once. The gateway offers senders a large maximum PDU
(DICOM_GATEWAY_MAX_PDU, 1 MiB): each PDU costs pynetdicom the same Python work whatever its
size, and with 16 KiB PDUs a 512 KiB slice took 34 of them.

Several processes may share the port(s) (`gateway_serve(processes=N)`, `dicom_gateway
--processes N`), so that concurrent associations use every core: the parent binds the listening
sockets, forks the processes, and each accepts from the same sockets, the least busy first (see
`Load`). SIGTERM stops listening and lets the running associations finish; SIGINT or SIGQUIT
aborts them (what was acknowledged is committed either way).

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

import logging
import math
import multiprocessing
import os
import re
import select
import signal
import socket
import ssl
import struct
import threading
import time
import weakref
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

from portal import metrics
from portal.addresses import address_listed
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
# The words /metrics counts refusals by (relay_gateway_associations_rejected_total{reason}).
REJECT_REASONS = {
    REJECT_CALLED_AE: "called_ae",
    REJECT_CALLING_AE: "calling_ae",
    REJECT_NO_REASON: "not_allowed",
    REJECT_BUSY: "unavailable",
    REJECT_LIMIT: "limit",
}
COMPOSITE_STORAGE = "1.2.840.10008.5.1.4.1.1."
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
# A sender that opens the TLS port and says nothing is dropped after this many seconds.
HANDSHAKE_TIMEOUT_S = 30
# Associations at once, over all the gateway's processes (each takes its share).
MAX_ASSOCIATIONS = 20
# A process holding more connections than a sibling leaves a waiting connection to the sibling
# for up to this long before taking it itself.
ACCEPT_DEFER_S = 0.05


def _allowed(listing: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", listing.strip()) if item]


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
    if not by_certificate and not address_listed(address, _allowed(facility.gateway_addresses)):
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


class Load:
    """How many connections each of the gateway's processes holds, in memory the processes share
    (an anonymous shared mapping made before the fork), so that the least busy one accepts the
    next connection. The processes share one listening socket and all wake when a sender
    connects; the kernel's own spreading (SO_REUSEPORT hashes the sender's address and port)
    ignores load, and put all four of four associations on one of two processes one time in
    eight."""

    def __init__(self, processes: int) -> None:
        self.counts = multiprocessing.RawArray("i", processes)
        self.slot = 0
        self._held: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()

    def held(self) -> int:
        """This process's open connections (published for the others); pynetdicom closes a
        connection's socket when its association ends."""
        with self._lock:
            count = sum(1 for sock in list(self._held) if sock.fileno() != -1)
        self.counts[self.slot] = count
        return count

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._held.add(sock)
        self.held()

    def busier(self) -> bool:
        """Whether another process holds fewer connections than this one."""
        mine = self.held()
        return any(count < mine for i, count in enumerate(self.counts) if i != self.slot)


class GatewayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, on a listening socket of its own or on one it shares with
    the gateway's other processes (`listening`, bound by the parent before the fork: the least
    busy process accepts, see `Load`)."""

    def __init__(
        self,
        *args: Any,
        listening: socket.socket | None = None,
        load: Load | None = None,
        **kwargs: Any,
    ) -> None:
        self.listening = listening
        self.load = load
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.listening is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = self.listening
        # Non-blocking: when a sibling process took the connection first, accept() fails at once
        # (socketserver ignores it) instead of blocking this process's accept loop.
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.listening is None:
            super().server_activate()

    def server_close(self) -> None:
        if self.listening is not None:
            # Closed before pynetdicom's shutdown(SHUT_RDWR), which would stop the socket for
            # the sibling processes too; the port closes when the last process lets go.
            assert self.socket is not None
            self.socket.close()
        super().server_close()

    def service_actions(self) -> None:
        super().service_actions()
        if self.load is not None:
            self.load.held()  # ended associations, published at least every poll interval

    def _accept(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        if self.load is not None:
            deadline = time.monotonic() + ACCEPT_DEFER_S
            while self.load.busier() and time.monotonic() < deadline:
                readable, _, _ = select.select([self.socket], [], [], 0.005)
                if not readable:
                    raise BlockingIOError("a less busy gateway process took the connection")
        client, address = self.socket.accept()
        # Nagle's algorithm off (transfers/dicom/net.py patches pynetdicom's own get_request,
        # which this class replaces).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def _held(self, client: socket.socket) -> None:
        if self.load is not None:
            self.load.add(client)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self._accept()
        self._held(client)
        return client, address


class TlsAssociationServer(GatewayServer):
    """pynetdicom's threaded server with the TLS handshake moved into the connection's own
    thread, under a time limit: in pynetdicom's accept loop, one sender that connects and stays
    silent would keep every other sender out."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.ssl_context is not None
        client, address = self._accept()
        wrapped = self.ssl_context.wrap_socket(
            client, server_side=True, do_handshake_on_connect=False
        )
        # The wrapped socket, which takes over the connection (and closes it at the end).
        self._held(wrapped)
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
    metrics.GATEWAY_REJECTED.labels(reason="tls").inc()
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

    def __init__(
        self, *, ae_title: str | None = None, max_associations: int = MAX_ASSOCIATIONS
    ) -> None:
        tcp_nodelay_enable()
        # Each received instance goes to a spool file as it arrives, not into memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.ae = AE(ae_title=ae_title or settings.DICOM_GATEWAY_AE_TITLE)
        # The largest PDU senders may send (A-ASSOCIATE-AC's Maximum Length): each PDU costs
        # pynetdicom the same Python work (state machine, queues, a write to the spool file)
        # whatever its size, and pynetdicom holds one PDU in memory at a time per association.
        self.ae.maximum_pdu_size = settings.DICOM_GATEWAY_MAX_PDU
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
        self.ae.maximum_associations = max_associations
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
        self,
        *,
        host: str,
        port: int,
        tls_context: ssl.SSLContext | None = None,
        listening: socket.socket | None = None,
        load: Load | None = None,
    ) -> GatewayServer:
        """Listen in background threads; with a TLS context, this port speaks DICOM TLS. With
        `listening`, on that socket (shared with the gateway's other processes) instead."""
        server = self.ae.make_server(
            (host, port),
            ssl_context=tls_context,
            evt_handlers=self.handlers,
            server_class=GatewayServer if tls_context is None else TlsAssociationServer,
            listening=listening,
            load=load,
        )
        assert isinstance(server, GatewayServer)
        name = "Gateway" if tls_context is None else "GatewayTLS"
        thread = threading.Thread(
            target=server.serve_forever, name=f"{name}@{server.server_address[1]}", daemon=True
        )
        thread.start()
        self.ae._servers.append(server)
        return server

    def serve(
        self,
        *,
        host: str,
        port: int,
        tls_port: int | None = None,
        stop: threading.Event,
        abort: threading.Event,
        listening: list[socket.socket] | None = None,
        load: Load | None = None,
    ) -> None:
        """Listen on `port`, and with TLS on `tls_port` when Relay has a certificate (or on the
        `listening` sockets the parent process bound: the plain one, then the TLS one), until
        `stop` is set; then stop listening and wait for the running associations to end, or
        abort them when `abort` is set."""
        context = gateway_context() if tls_port else None
        plain = listening[0] if listening else None
        tls = listening[1] if listening and len(listening) > 1 else None
        servers = [self.start(host=host, port=port, listening=plain, load=load)]
        if context is not None and tls_port:
            servers.append(
                self.start(host=host, port=tls_port, tls_context=context, listening=tls, load=load)
            )
        parent = os.getppid()
        try:
            # A process whose parent died (SIGKILL) stops too, rather than serve alone.
            while not stop.wait(1.0) and (listening is None or os.getppid() == parent):
                pass
        finally:
            for server in servers:
                server.shutdown()
        said = False
        while running := [a for a in self.ae.active_associations if a.is_acceptor]:
            if abort.is_set():
                log.warning("gateway: aborting %d association(s)", len(running))
                for assoc in running:
                    assoc.abort()
                break
            if not said:
                log.info("gateway: stopping, waiting for %d association(s) to end", len(running))
                said = True
            abort.wait(0.2)

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
            metrics.GATEWAY_REJECTED.labels(reason=REJECT_REASONS[REJECT_BUSY]).inc()
            _reject(assoc, REJECT_BUSY)
            return
        if isinstance(caller, Refusal):
            log.warning(
                "gateway: refused %s@%s calling %s: %s", calling, address, called, caller.reason
            )
            _refusal_audit(caller, called_ae=called, calling_ae=calling, address=address)
            metrics.GATEWAY_REJECTED.labels(reason=REJECT_REASONS.get(caller.code, "other")).inc()
            _reject(assoc, caller.code)
            # No EVT_RELEASED follows a refusal: this thread's connection is closed here.
            connections.close_all()
            return
        with self._lock:
            self.callers[id(assoc)] = caller
        metrics.GATEWAY_ACCEPTED.inc()
        metrics.GATEWAY_ACTIVE.inc()
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
            admitted = self.callers.pop(id(event.assoc), None)
            self.marked = {key for key in self.marked if key[0] != id(event.assoc)}
        if admitted is not None:
            metrics.GATEWAY_ACTIVE.dec()
        # Each association runs in its own thread with its own database connection.
        connections.close_all()


GRACEFUL = signal.SIGTERM
QUICK = (signal.SIGINT, signal.SIGQUIT)


def gateway_serve(
    *, host: str, port: int, tls_port: int | None, ae_title: str, processes: int = 1
) -> int:
    """Run the gateway in `processes` processes sharing the port(s) until SIGTERM (stop
    listening, let the running associations finish) or SIGINT / SIGQUIT (abort them); the exit
    status. With several, this process binds the sockets, forks the others and forwards the
    signals to them; a process that ends on its own stops the others (exit status 1), for the
    supervisor to start the gateway again."""
    with_tls = bool(tls_port) and gateway_context() is not None
    # Every process of the gateway counts into the node's metrics folder (portal/metrics.py).
    metrics.metrics_process_start(f"gateway.{port}", settings.RELAY_METRICS_DIR)
    if processes <= 1:
        _metrics_exporter_start()
        _serve_signalled(
            Gateway(ae_title=ae_title),
            host=host,
            port=port,
            tls_port=tls_port if with_tls else None,
        )
        return 0
    listening = [_listen(host, port)]
    if with_tls:
        assert tls_port
        listening.append(_listen(host, tls_port))
    load = Load(processes)
    # Each process opens its own database connections: none may be inherited (a connection
    # used by two processes corrupts both), so none is open at the fork.
    connections.close_all()
    handled = (GRACEFUL, *QUICK)
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # until each side has its handlers
    children: dict[int, int] = {}
    for slot in range(processes):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (runs in the child; the tests see it from outside)
            code = 1
            try:
                connections.close_all()
                load.slot = slot
                gateway = Gateway(
                    ae_title=ae_title, max_associations=math.ceil(MAX_ASSOCIATIONS / processes)
                )
                _serve_signalled(
                    gateway,
                    host=host,
                    port=port,
                    tls_port=tls_port if with_tls else None,
                    listening=listening,
                    load=load,
                )
                code = 0
            except BaseException:
                log.exception("gateway: process %d failed", os.getpid())
            finally:
                os._exit(code)
        children[pid] = slot
    # The children hold the sockets now: the port closes when the last of them stops listening.
    for sock in listening:
        sock.close()
    log.info("gateway: %d processes: %s", processes, " ".join(map(str, children)))
    _metrics_exporter_start()  # after the fork: no child inherits its thread
    status = 0
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in handled:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        children.pop(pid, None)
        metrics.metrics_process_dead(pid)  # its open associations count no more
        if not stopping:
            log.error(
                "gateway: process %d ended (%s): stopping the others",
                pid,
                os.waitstatus_to_exitcode(wait_status),
            )
            status = 1
            forward(GRACEFUL, None)
    return status


def _metrics_exporter_start() -> None:
    """On a node without a web server, the node's metrics on RELAY_METRICS_PORT."""
    if settings.RELAY_METRICS_PORT:
        metrics.metrics_exporter_start(
            bind=settings.RELAY_METRICS_BIND, port=settings.RELAY_METRICS_PORT
        )


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for the gateway's processes to share (pynetdicom's options: address
    reuse, so a restart does not wait for TIME_WAIT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(socket.SOMAXCONN)
    return sock


def _serve_signalled(gateway: Gateway, **kwargs: Any) -> None:
    """`Gateway.serve` until SIGTERM (graceful) or SIGINT / SIGQUIT (abort)."""
    stop, abort = threading.Event(), threading.Event()

    def graceful(_signum: int, _frame: Any) -> None:
        stop.set()

    def quick(_signum: int, _frame: Any) -> None:
        stop.set()
        abort.set()

    signal.signal(GRACEFUL, graceful)
    for signum in QUICK:
        signal.signal(signum, quick)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (GRACEFUL, *QUICK))
    gateway.serve(stop=stop, abort=abort, **kwargs)


def _file_meta(path: Path, *, source_ae: str) -> tuple[bytes, int]:
    """The preamble, prefix and file meta of the instance as Relay stores it: pynetdicom's, with
    the Source Application Entity Title (0002,0016) of the sender (PS3.10 7.1); and where the
    data set starts in pynetdicom's spool file.

    pynetdicom's meta ends with (0002,0013), so the title is appended to its bytes and the
    group length set again: no parse and re-encode of the meta per instance (that was about a
    tenth of the gateway's own time per instance). Anything else is re-encoded with pydicom."""
    with path.open("rb") as f:
        head = f.read(PREFIX + 12)
        if head[PREFIX - 4 : PREFIX + 8] == b"DICM" + GROUP_LENGTH_HEADER:
            (length,) = struct.unpack("<I", head[PREFIX + 8 :])
            elements = f.read(length)
            last = _last_meta_tag(elements)
            if len(elements) == length and last is not None and last < 0x0016:
                value = source_ae[:16].encode("ascii", "replace")
                value += b" " * (len(value) % 2)
                elements += struct.pack("<HH2sH", 0x0002, 0x0016, b"AE", len(value)) + value
                meta = head[:PREFIX] + GROUP_LENGTH_HEADER + struct.pack("<I", len(elements))
                return meta + elements, PREFIX + 12 + length
    return _file_meta_reencoded(path, source_ae=source_ae)


PREFIX = 128 + 4
# (0002,0000) UL, length 4: the File Meta Information Group Length's header.
GROUP_LENGTH_HEADER = struct.pack("<HH2sH", 0x0002, 0x0000, b"UL", 4)


def _last_meta_tag(elements: bytes) -> int | None:
    """The element number of the last element of an explicit VR little endian group 0002, or
    None when the bytes are not one."""
    at, last = 0, None
    while at < len(elements):
        if at + 8 > len(elements):
            return None
        group, element, vr = struct.unpack_from("<HH2s", elements, at)
        if group != 0x0002:
            return None
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            if at + 12 > len(elements):
                return None
            (size,) = struct.unpack_from("<I", elements, at + 8)
            at += 12 + size
        else:
            (size,) = struct.unpack_from("<H", elements, at + 6)
            at += 8 + size
        last = element
    return last if at == len(elements) else None


def _file_meta_reencoded(path: Path, *, source_ae: str) -> tuple[bytes, int]:
    meta = read_file_meta_info(path)
    offset = PREFIX + 12 + int(meta.FileMetaInformationGroupLength)
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
