"""`relay send study.zip` and `relay send disc.iso` (issue 14, defect 6).

On main, a ZIP or a disc image given as FOLDER was one file "skipped (not DICOM)", and the run
ended "Every DICOM file is on the server" with exit code 0 and nothing imported. Now the files
inside are read from the archive directly (nothing extracted), with the folder's rules: the
DICOMDIR decides what is sent, DICOMDIRs are counted and not sent, a second run sends nothing.
What arrives is byte for byte what was in the archive (the stored copies' SHA-256 against the
originals'). Archives that cannot be read stop the run with exit code 2 and the reason; members
that would hurt (zip bombs, encrypted, damaged) are refused or failed by name, the rest is sent.

Peers: Relay's own study ZIP (downloaded from the server) and its own CD image (the export's
ISO 9660 + Joliet builder) sent to a second facility; ISOs built with pycdlib; ZIPs with zipfile.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pycdlib
import pydicom
import pytest
from django.core.files.storage import storages
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian

from portal.models import Facility, User
from relay_client import archives
from relay_client.files import stored_sha256
from tests.helpers import client_for
from tests.relay_client import test_relay_send as base
from tests.relay_client.test_relay_send import relay_send, summary, uploads_audited
from transfers.media.export import export_plan, iso_build
from transfers.models import Instance, Study
from transfers.reports import reports_for

dana_token = base.dana_token
erin_token = base.erin_token
nvh = base.nvh
glacier = base.glacier
_no_relay_environment = base._no_relay_environment

pytestmark = pytest.mark.django_db(transaction=True)  # the live server sees only committed rows


# --- building archives --------------------------------------------------------------------------


def _staging(folder: Path) -> dict[str, str]:
    """An IHE PDI layout in `folder` (DICOMDIR + three images), a README and a viewer sample
    the DICOMDIR does not list. Returns {SOP Instance UID: stored SHA-256} of the images."""
    fileset = FileSet()
    for name in ("CT_small.dcm", "CT_small.dcm", "MR_small.dcm"):
        fileset.add(base._dataset(name))
    fileset.write(folder)
    originals = {}
    for path in folder.rglob("IM*"):
        originals[str(pydicom.dcmread(path).SOPInstanceUID)] = stored_sha256(path)
    (folder / "README.TXT").write_text("Burned by the CD robot.\n")
    (folder / "VIEWER").mkdir()
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "VIEWER" / "SAMPLE.DCM")
    return originals


def _zip_folder(folder: Path, target: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return target


def _iso_folder(folder: Path, target: Path) -> Path:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident="RELAYTEST")
    for path in sorted(folder.rglob("*")):
        name = "/" + path.relative_to(folder).as_posix().upper()
        if path.is_dir():
            iso.add_directory(name)
        else:
            iso.add_file(str(path), name + (";1" if "." in path.name else ".;1"))
    iso.write(str(target))
    iso.close()
    return target


def _dicom(name: str = "CT_small.dcm") -> tuple[bytes, str]:
    ds = base._dataset(name)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), str(ds.SOPInstanceUID)


def stored_copies(facility: Facility) -> dict[str, str]:
    """{SOP Instance UID: SHA-256 of the stored file's bytes}, read back from the image store."""
    storage = storages["default"]
    copies = {}
    for instance in Instance.objects.filter(facility=facility):
        with storage.open(instance.storage_key, "rb") as fp:
            copies[instance.sop_instance_uid] = hashlib.sha256(fp.read()).hexdigest()
    return copies


def _send(capsys, url: str, token: str, target: Path, *args: str) -> tuple[int, str, str]:
    return relay_send(capsys, str(target), "--server", url, "--token", token, *args)


# --- ZIPs and disc images are read, and only what the DICOMDIR lists is sent ---------------------


@pytest.mark.parametrize("prefix", ["", "PATIENT CD/"])
def test_a_zip_of_a_disc_is_sent_byte_for_byte_and_a_second_run_sends_nothing(
    live_server, dana_token, nvh, tmp_path, capsys, prefix
):
    originals = _staging(tmp_path / "staging")
    study_zip = _zip_folder(tmp_path / "staging", tmp_path / "study.zip", prefix=prefix)

    code, out, err = _send(capsys, live_server.url, dana_token, study_zip)

    assert code == 0, out + err
    counts = summary(out)
    assert (counts["stored"], counts["skipped"], counts["failed"]) == (3, 0, 0)
    assert counts["DICOMDIR (index, not sent)"] == 1
    assert f"  {prefix}DICOMDIR\n" in out
    assert "Every DICOM file is on the server." in out
    # Exactly the images the DICOMDIR lists (not the viewer's sample), stored byte for byte.
    assert stored_copies(nvh) == originals
    assert uploads_audited() == 3
    assert set(Study.objects.values_list("status", flat=True)) == {"complete"}, out

    # Resume: the second run of the same command finds everything on the server.
    code, out, err = _send(capsys, live_server.url, dana_token, study_zip)
    assert code == 0, out + err
    assert (summary(out)["stored"], summary(out)["already on server"]) == (0, 3)
    assert uploads_audited() == 3


def test_a_zip_of_two_discs_sends_both(live_server, dana_token, nvh, tmp_path, capsys):
    # No DICOMDIR covers the whole archive: every member is a candidate, as for a folder of
    # two discs, and both indexes are counted. Sending only cd1's would lose cd2 silently.
    uids = set()
    for disc, names in (("cd1", ("CT_small.dcm", "MR_small.dcm")), ("cd2", ("CT_small.dcm",))):
        fileset = FileSet()
        for name in names:
            ds = base._dataset(name)
            uids.add(str(ds.SOPInstanceUID))
            fileset.add(ds)
        fileset.write(tmp_path / "discs" / disc)
    target = _zip_folder(tmp_path / "discs", tmp_path / "discs.zip")

    code, out, err = _send(capsys, live_server.url, dana_token, target)

    assert code == 0, out + err
    assert (summary(out)["stored"], summary(out)["DICOMDIR (index, not sent)"]) == (3, 2)
    assert "\n  cd1/DICOMDIR\n  cd2/DICOMDIR\n" in out
    assert set(stored_copies(nvh)) == uids


def test_a_zip_without_a_dicomdir_sends_every_dicom_member_and_names_the_rest(
    live_server, dana_token, nvh, tmp_path, capsys
):
    first, first_uid = _dicom("CT_small.dcm")
    second, second_uid = _dicom("MR_small.dcm")
    target = tmp_path / "export.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/one.dcm", first)
        # Names that would escape a folder if extracted: here they are only labels.
        archive.writestr("../../escape.dcm", second)
        archive.writestr("notes.txt", "not an image")
        archive.writestr("empty/", "")  # a folder entry

    code, out, err = _send(capsys, live_server.url, dana_token, target)

    assert code == 0, out + err
    assert (summary(out)["stored"], summary(out)["skipped"]) == (2, 1)
    assert "Skipped:\n  notes.txt: not a DICOM file (no DICM marker)\n" in out
    assert set(stored_copies(nvh)) == {first_uid, second_uid}
    assert stored_copies(nvh)[first_uid] == hashlib.sha256(bytes(128) + first[128:]).hexdigest()
    assert not (tmp_path.parent.parent / "escape.dcm").exists()
    assert not Path("escape.dcm").exists()


def test_a_disc_image_made_with_pycdlib_is_sent_byte_for_byte(
    live_server, dana_token, nvh, tmp_path, capsys
):
    originals = _staging(tmp_path / "staging")
    disc = _iso_folder(tmp_path / "staging", tmp_path / "disc.iso")

    code, out, err = _send(capsys, live_server.url, dana_token, disc)

    assert code == 0, out + err
    counts = summary(out)
    assert (counts["stored"], counts["skipped"], counts["DICOMDIR (index, not sent)"]) == (3, 0, 1)
    assert stored_copies(nvh) == originals  # not the viewer's sample, not README.TXT
    code, out, _ = _send(capsys, live_server.url, dana_token, disc)
    assert (code, summary(out)["already on server"], summary(out)["stored"]) == (0, 3, 0)


def test_relays_own_zip_and_cd_image_carry_a_study_to_another_facility(
    live_server, erin_token, nvh, glacier, tmp_path, capsys
):
    # North Valley sends a study; erin downloads its ZIP from the server, as a browser does,
    # and sends it to Glacier Clinic with relay send.
    originals = _staging(tmp_path / "staging")
    code, out, err = _send(
        capsys, live_server.url, erin_token, tmp_path / "staging", "--facility", "nvh"
    )
    assert code == 0, out + err
    erin = User.objects.get(email="erin@glacier.example")
    studies = list(Study.objects.filter(facility=nvh))
    study_zip = tmp_path / "download.zip"
    for study in studies:
        response = client_for(erin).get(f"/studies/{study.uuid}/download/")
        assert response.status_code == 200
        assert response["Content-Type"] == "application/zip"
        study_zip.write_bytes(b"".join(response.streaming_content))
        code, out, err = _send(
            capsys, live_server.url, erin_token, study_zip, "--facility", "glacier"
        )
        assert code == 0, out + err
        assert summary(out)["DICOMDIR (index, not sent)"] == 1
    assert stored_copies(glacier) == originals  # what North Valley had, byte for byte

    # Relay's own CD image of the same studies: everything is already at Glacier.
    disc = tmp_path / "relay.iso"
    plan = export_plan(studies=studies, reports_of=lambda study: reports_for(study, share_ids=None))
    with disc.open("wb") as out_fp:
        iso_build(plan, out=out_fp)
    before = uploads_audited()
    code, out, err = _send(capsys, live_server.url, erin_token, disc, "--facility", "glacier")
    assert code == 0, out + err
    assert (summary(out)["already on server"], summary(out)["stored"]) == (3, 0)
    assert uploads_audited() == before


def test_a_folder_names_the_archives_in_it_instead_of_calling_them_not_dicom(
    live_server, dana_token, tmp_path, capsys
):
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    _zip_folder(folder, tmp_path / "inner.zip")
    shutil.move(tmp_path / "inner.zip", folder / "from the clinic.zip")
    (folder / "disc.iso").write_bytes(b"\0" * 100)

    code, out, err = _send(capsys, live_server.url, dana_token, folder)

    assert code == 0, out + err
    assert "  disc.iso: archive, not read: send it on its own (relay send FILE)\n" in out
    assert "  from the clinic.zip: archive, not read: send it on its own (relay send FILE)\n" in out
    assert "2 archives in it (named above) were not read" in out
    assert "Every DICOM file is on the server." not in out


# --- archives that cannot be read, and members that would hurt ---------------------------------


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("study.zip", b"These are not the images you are looking for.\n", "as a ZIP archive"),
        ("disc.iso", b"Neither is this.\n" * 10, "as an ISO 9660 disc image"),
        ("cut.zip", None, "as a ZIP archive"),  # a download cut short: no central directory
        ("cut.iso", None, "as an ISO 9660 disc image"),
    ],
)
def test_an_archive_that_cannot_be_read_stops_the_run_with_exit_2(
    live_server, dana_token, tmp_path, capsys, name, content, problem
):
    target = tmp_path / name
    if content is not None:
        target.write_bytes(content)
    else:
        staging = tmp_path / "staging"
        _staging(staging)
        whole = (_zip_folder if name.endswith(".zip") else _iso_folder)(staging, tmp_path / "w")
        data = whole.read_bytes()
        # A ZIP without its end, an ISO without its directory records and files.
        target.write_bytes(data[: len(data) - 200] if name.endswith(".zip") else data[:34000])

    code, out, err = _send(capsys, live_server.url, dana_token, target)

    assert code == 2, out + err
    assert f"relay: {name} cannot be read {problem}" in err
    assert "nothing was sent" in err
    assert "Every DICOM file is on the server" not in out + err
    assert "not DICOM" not in out + err
    assert uploads_audited() == 0


def _flag_encrypted(data: bytes, name: str) -> bytes:
    """Set the 'encrypted' flag (bit 0) on `name` in both its local and central headers."""
    out = bytearray(data)
    encoded = name.encode()
    for signature, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        start = 0
        while (at := out.find(signature, start)) >= 0:
            if out[at + name_at : at + name_at + len(encoded)] == encoded:
                (flags,) = struct.unpack_from("<H", out, at + flag_at)
                struct.pack_into("<H", out, at + flag_at, flags | 1)
            start = at + 4
    return bytes(out)


def _claim_size(data: bytes, name: str, size: int) -> bytes:
    """Make the central directory claim `size` uncompressed bytes for `name`."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    encoded = name.encode()
    while at >= 0:
        if out[at + 46 : at + 46 + len(encoded)] == encoded:
            struct.pack_into("<I", out, at + 24, size)
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def test_zip_bombs_encrypted_and_damaged_members_are_refused_by_name_and_the_rest_is_sent(
    live_server, dana_token, nvh, tmp_path, capsys
):
    good, good_uid = _dicom("CT_small.dcm")
    damaged, _ = _dicom("MR_small.dcm")
    secret, _ = _dicom("CT_small.dcm")
    # A DICOM header in front of 64 MiB of zeros: 1000 times smaller compressed.
    bomb = bytearray(good) + bytes(64 * 1024 * 1024)
    target = tmp_path / "mixed.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("good.dcm", good, compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("bomb.dcm", bytes(bomb), compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("huge.dcm", good, compress_type=zipfile.ZIP_STORED)
        archive.writestr("secret.dcm", secret, compress_type=zipfile.ZIP_STORED)
        archive.writestr("damaged.dcm", damaged, compress_type=zipfile.ZIP_STORED)
    data = target.read_bytes()
    data = _flag_encrypted(data, "secret.dcm")
    data = _claim_size(data, "huge.dcm", 0xFFFFFFFE)  # about 4.3 GB, from a few kB
    at = data.find(damaged[-3000:])  # damage the image data of damaged.dcm: its CRC fails
    data = data[:at] + bytes(1000) + data[at + 1000 :]
    target.write_bytes(data)

    code, out, err = _send(capsys, live_server.url, dana_token, target)

    assert code == 1, out + err  # not everything in the archive is on the server
    counts = summary(out)
    assert (counts["stored"], counts["refused (not read)"], counts["failed"]) == (1, 3, 1)
    assert "Refused, not read from the archive:\n" in out
    assert "  bomb.dcm: would expand " in out and "as a zip bomb does" in out
    assert "  huge.dcm: would expand " in out and "to 4,294,967,294" in out
    assert "  secret.dcm: encrypted (password-protected)" in out
    assert "  damaged.dcm: The file could not be read: it cannot be read from mixed.zip" in out
    assert "CRC" in out
    assert set(stored_copies(nvh)) == {good_uid}
    assert uploads_audited() == 1


def test_a_member_claiming_more_than_any_dicom_file_is_refused_unread() -> None:
    info = zipfile.ZipInfo("scan.dcm")
    info.file_size, info.compress_size = 5 * 1024**4, 5 * 1024**4  # 5 TiB, stored
    assert archives._zip_refusal(info) == (
        "claims 5,497,558,138,880 bytes uncompressed, more than any DICOM file can be; not read"
    )
    info.file_size, info.compress_size = 300 * 1024**2, 100 * 1024**2  # an ordinary ratio
    assert archives._zip_refusal(info) is None


def test_an_encrypted_zip_stops_the_run_with_the_reason(live_server, dana_token, tmp_path, capsys):
    first, _ = _dicom()
    target = tmp_path / "locked.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("IM1", first)
    target.write_bytes(_flag_encrypted(target.read_bytes(), "IM1"))

    code, out, err = _send(capsys, live_server.url, dana_token, target)

    assert code == 2, out + err
    assert "relay: locked.zip is encrypted (password-protected): Relay cannot read it" in err
    assert uploads_audited() == 0


# --- memory ------------------------------------------------------------------------------------


def _peak_rss_kib(url: str, token: str, target: Path) -> int:
    """Run `relay send` in a child process; its peak resident memory in KiB."""
    # VmHWM, not ru_maxrss: after fork and exec, ru_maxrss still counts the parent's pages.
    script = (
        "import re, sys\n"
        "from relay_client.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "status = open('/proc/self/status').read()\n"
        "print('PEAK', re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "send", str(target), "-q", "--server", url],
        env={**os.environ, "RELAY_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stderr.rsplit("PEAK", 1)[1].split()[0])


def test_a_large_member_is_streamed_not_read_whole(live_server, dana_token, tmp_path):
    small = tmp_path / "small.zip"
    with zipfile.ZipFile(small, "w") as archive:
        archive.writestr("IM1", _dicom()[0])
    # One 108 MB image (multi-frame, incompressible pixels), stored in the ZIP.
    ds = base._dataset("CT_small.dcm")
    frames = 3300
    ds.NumberOfFrames = frames
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = os.urandom(ds.Rows * ds.Columns * 2 * frames)
    big_dicom = tmp_path / "big.dcm"
    ds.save_as(big_dicom, enforce_file_format=True)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as archive:
        archive.write(big_dicom, "IM1")
    size = big_dicom.stat().st_size
    assert size > 100 * 1024**2

    baseline = _peak_rss_kib(live_server.url, dana_token, small)
    peak = _peak_rss_kib(live_server.url, dana_token, big)

    assert Instance.objects.get(sop_instance_uid=ds.SOPInstanceUID).size_bytes == size
    assert (peak - baseline) * 1024 < size / 10, (baseline, peak)
