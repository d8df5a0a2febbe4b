"""The gateway's memory stays flat in instance size: a large C-STORE is written to a spool file
as its PDUs arrive, not gathered in memory (on main, a 300 MB instance took the gateway from
117 MB to 1.04 GB). Measured on a real `manage.py dicom_gateway` process fed by dcmtk's storescu.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.servers import free_port, stop_process_tree
from portal.models import Facility
from tests.helpers import dicom_bytes, gateway_allow, require_peer
from tests.transfers.test_hostile_files import ROOT, _database_url
from transfers.models import Instance

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]

MiB = 1024 * 1024
FRAME = 512 * 512 * 2
FRAMES = 512  # 256 MiB of pixel data
# What the gateway may grow by while receiving it: pynetdicom's buffers, ingest's chunks.
GROWTH_CEILING_MB = 64


def _large_instance(path: Path) -> str:
    """A 256 MiB multi-frame CT, written without holding its pixel data in memory."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "MEM-1"
    ds.PatientName = "Memory^Test"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = FRAMES
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as f:
        # (7FE0,0010) OW, then the frames.
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, FRAME * FRAMES))
        frame = bytes(range(256)) * (FRAME // 256)
        for _ in range(FRAMES):
            f.write(frame)
    return str(ds.SOPInstanceUID)


def _peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _store(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    storescu = require_peer("storescu")
    return subprocess.run(
        [storescu, "-aet", "PACS1", "-aec", "KRMC", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_256_mib_instance_leaves_the_gateways_memory_flat(krmc: Facility, tmp_path: Path) -> None:
    gateway_allow(krmc, "PACS1")
    small = tmp_path / "small.dcm"
    small.write_bytes(dicom_bytes("CT_small.dcm"))
    large = tmp_path / "large.dcm"
    large_uid = _large_instance(large)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "RELAY_VAR_DIR": str(tmp_path / "var"),
        "TMPDIR": str(tmp_path),
    }
    log = (tmp_path / "gateway.log").open("w")
    gateway = subprocess.Popen(
        [
            sys.executable, "manage.py", "dicom_gateway", "--host", "127.0.0.1",
            "--port", str(port), "--tls-port", "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        # A small instance first, so everything a store needs is loaded before the baseline.
        assert _store(port, small).returncode == 0
        baseline = _peak_mb(gateway.pid)

        sent = _store(port, large)

        peak = _peak_mb(gateway.pid)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        stop_process_tree(gateway)  # type: ignore[arg-type]
        log.close()
    instance = Instance.objects.get(sop_instance_uid=large_uid)
    assert instance.size_bytes > FRAME * FRAMES
    assert peak - baseline < GROWTH_CEILING_MB, (baseline, peak)
    # pynetdicom's spool files are gone once each instance is answered.
    assert not list(tmp_path.glob("tmp*.dcm"))
    # What was stored reads back as the instance that was sent.
    stored = pydicom.dcmread(
        tmp_path / "var" / "media" / instance.storage_key, stop_before_pixels=True
    )
    assert stored.SOPInstanceUID == large_uid
