"""The gateway at scale: a large maximum PDU offered to senders, and several processes sharing
the port so that concurrent associations use every core, stopped gracefully by SIGTERM.

The processes are a real `manage.py dicom_gateway --processes 2`, fed by pynetdicom requestors
that hold their associations open, so that which process serves each one can be read from the
processes' own sockets."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pydicom
import pytest
from django.conf import settings
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from bench.servers import free_port, stop_process_tree
from portal.models import Facility
from tests.helpers import dicom_bytes, gateway_allow, gateway_running
from tests.transfers.test_hostile_files import ROOT, _database_url
from transfers.models import Instance

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]


def _requestor() -> AE:
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    return ae


def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(dicom_bytes("CT_small.dcm")))


def test_it_offers_senders_its_large_maximum_pdu(krmc: Facility) -> None:
    gateway_allow(krmc, "PACS1")
    with gateway_running() as port:
        assoc = _requestor().associate("127.0.0.1", port, ae_title="KRMC")
        try:
            assert assoc.is_established
            # A-ASSOCIATE-AC's Maximum Length: what the sender may send in one PDU.
            assert assoc.acceptor.maximum_length == settings.DICOM_GATEWAY_MAX_PDU
            assert settings.DICOM_GATEWAY_MAX_PDU >= 1024 * 1024
            assert assoc.send_c_store(_ct()).Status == 0x0000
        finally:
            assoc.release()
    assert Instance.objects.filter(facility=krmc).count() == 1


@pytest.fixture
def two_processes(krmc: Facility, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    gateway_allow(krmc, "PACS1")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": _database_url(), "RELAY_VAR_DIR": str(tmp_path / "var")}
    with (tmp_path / "gateway.log").open("w") as log:
        gateway = subprocess.Popen(
            [
                sys.executable, "manage.py", "dicom_gateway", "--host", "127.0.0.1",
                "--port", str(port), "--tls-port", "0", "--processes", "2",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assoc = _requestor().associate("127.0.0.1", port, ae_title="KRMC")
            if assoc.is_established:
                assoc.release()
                break
            assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            time.sleep(0.3)
        yield gateway, port
    finally:
        stop_process_tree(gateway)  # type: ignore[arg-type]


def _serving(children: list[psutil.Process], port: int) -> dict[int, int]:
    """Established connections on the gateway's port, per process id."""
    return {
        child.pid: sum(
            1
            for conn in child.net_connections(kind="tcp")
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED
        )
        for child in children
    }


def test_two_processes_share_four_parallel_associations(
    two_processes: tuple[subprocess.Popen[bytes], int], krmc: Facility
) -> None:
    gateway, port = two_processes
    children = psutil.Process(gateway.pid).children()
    assert len(children) == 2
    associations: list[Any] = []
    try:
        for _ in range(4):
            assoc = _requestor().associate("127.0.0.1", port, ae_title="KRMC")
            assert assoc.is_established
            associations.append(assoc)
        time.sleep(0.3)  # both processes see their sockets
        # Each process serves two: the least busy accepts the next association.
        assert sorted(_serving(children, port).values()) == [2, 2]
        for assoc in associations:
            assert assoc.send_c_store(_ct()).Status == 0x0000
    finally:
        for assoc in associations:
            assoc.release()
    assert Instance.objects.filter(facility=krmc).count() == 4


def test_sigterm_lets_running_associations_finish_then_stops_every_process(
    two_processes: tuple[subprocess.Popen[bytes], int], krmc: Facility
) -> None:
    gateway, port = two_processes
    children = psutil.Process(gateway.pid).children()
    assoc = _requestor().associate("127.0.0.1", port, ae_title="KRMC")
    assert assoc.is_established

    gateway.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    # No new association is taken...
    late = _requestor().associate("127.0.0.1", port, ae_title="KRMC")
    assert not late.is_established
    # ...but the running one goes on, and what it sends is stored and acknowledged.
    assert gateway.poll() is None
    assert assoc.send_c_store(_ct()).Status == 0x0000
    assoc.release()

    assert gateway.wait(timeout=30) == 0
    for child in children:
        child.wait(timeout=10)
        assert not child.is_running()
    assert Instance.objects.filter(facility=krmc).count() == 1
