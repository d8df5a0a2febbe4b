"""TCP_NODELAY on every DICOM connection Relay makes or accepts.

DIMSE sends a command and a data set as separate small writes and then waits for the answer;
with Nagle's algorithm on, each exchange can wait for a delayed ACK. dcmtk and Orthanc turn it
off (dcmtk reads TCP_NODELAY from the environment); pynetdicom 3.0 sets no option but
SO_REUSEADDR and offers no hook for socket options, so this module adds it to the two places
pynetdicom creates sockets: the requestor's socket (push, C-ECHO tests) and the sockets the
server accepts (the gateway). Measured by `make bench`: a 300-instance push took 5.6 s without
it and 3.6 s with it.
"""

from __future__ import annotations

import socket
from typing import Any

_applied = False


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket (or already closed): nothing to tune


def tcp_nodelay_enable() -> None:
    """Patch pynetdicom's socket creation once per process (idempotent)."""
    from pynetdicom import transport  # not at import: the PACS pages import the push module

    global _applied
    if _applied:
        return
    create_socket = transport.AssociationSocket._create_socket
    get_request = transport.AssociationServer.get_request

    def create_socket_nodelay(self: Any, address: Any) -> socket.socket:
        sock = create_socket(self, address)
        _nodelay(sock)
        return sock

    def get_request_nodelay(self: Any) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = get_request(self)
        _nodelay(sock)
        return sock, address

    transport.AssociationSocket._create_socket = create_socket_nodelay  # type: ignore[method-assign]
    transport.AssociationServer.get_request = get_request_nodelay  # type: ignore[method-assign]
    _applied = True
