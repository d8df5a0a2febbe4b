"""What `relay send` tells the user about the files it did not send (issue 13, finding 9).

A DICOMDIR is counted and named, and not sent: it is the index of a disc, which the server
refuses ("This is a DICOMDIR ..., not an image"). Files left out are named with the reason (not
DICOM, empty, a link leading outside the folder), the first 20 and a count of the rest. pydicom's
warnings about odd files stay out of the output: the server is the judge of those files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from tests.helpers import dicom_bytes
from tests.relay_client import test_relay_send as base
from tests.relay_client.test_relay_send import relay_send, summary, uploads_audited
from transfers.models import Instance

dana_token = base.dana_token
nvh = base.nvh
_no_relay_environment = base._no_relay_environment

pytestmark = pytest.mark.django_db(transaction=True)  # the live server sees only committed rows


def _disc(folder: Path, *names: str) -> None:
    """An IHE PDI disc in `folder`: a DICOMDIR and the images it lists."""
    fileset = FileSet()
    for name in names:
        fileset.add(base._dataset(name))
    fileset.write(folder)


def test_dicomdirs_are_counted_and_named_and_not_sent(live_server, dana_token, tmp_path, capsys):
    # Two patient CDs copied into one folder, and a DICOMDIR saved under another name. On main
    # they were in no count and named nowhere.
    folder = tmp_path / "cds"
    _disc(folder / "cd1", "CT_small.dcm", "MR_small.dcm")
    _disc(folder / "cd2", "CT_small.dcm")
    shutil.copy(folder / "cd1" / "DICOMDIR", folder / "index.dcm")

    code, out, err = relay_send(
        capsys, str(folder), "--server", live_server.url, "--token", dana_token
    )

    assert code == 0, out + err
    counts = summary(out)
    assert (counts["stored"], counts["DICOMDIR (index, not sent)"]) == (3, 3)
    assert re.search(
        r"^DICOMDIR \(the index of a disc; the server takes the images it lists, not the index\):"
        r"\n  cd1/DICOMDIR\n  cd2/DICOMDIR\n  index\.dcm\n",
        out,
        re.MULTILINE,
    )
    assert uploads_audited() == 3  # the images only
    assert "Every DICOM file is on the server." in out


def test_skipped_files_are_named_with_the_reason_the_first_20_and_a_count(
    live_server, dana_token, tmp_path, capsys
):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "IM1.dcm").write_bytes(dicom_bytes())
    (folder / "0-empty.dcm").write_bytes(b"")
    outside = tmp_path / "private.dcm"
    outside.write_bytes(dicom_bytes())
    (folder / "0-link.dcm").symlink_to(outside)
    for n in range(1, 26):
        (folder / f"viewer-{n:02d}.dll").write_bytes(b"MZ" + bytes(200))

    code, out, err = relay_send(
        capsys, str(folder), "--server", live_server.url, "--token", dana_token
    )

    assert code == 0, out + err  # nothing DICOM was left out
    assert summary(out)["skipped"] == 27
    section = out.split("Skipped:\n", 1)[1].splitlines()
    assert section[:3] == [
        "  0-empty.dcm: an empty file",
        "  0-link.dcm: a link to a file outside the folder",
        "  viewer-01.dll: not a DICOM file (no DICM marker)",
    ]
    assert section[19] == "  viewer-18.dll: not a DICOM file (no DICM marker)"
    assert section[20] == "  ... and 7 more"
    assert Instance.objects.count() == 1


def test_pydicom_warnings_stay_out_of_the_output(live_server, dana_token, tmp_path):
    # bad_sequence.dcm carries values pydicom warns about ("Invalid value for VR UI: ...") when
    # it reads them; on main those warnings reached the user's terminal.
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(get_testdata_file("bad_sequence.dcm"), folder / "odd.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    env = {**os.environ, "RELAY_SERVER": live_server.url, "RELAY_TOKEN": dana_token}
    result = subprocess.run(
        [str(base.RELAY), "send", str(folder), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Warning" not in result.stderr, result.stderr
    assert "Invalid value" not in result.stderr + result.stdout
    # The server, not the uploader, says what is wrong with the odd file.
    assert result.returncode == 1
    assert (summary(result.stdout)["stored"], summary(result.stdout)["rejected"]) == (1, 1)
    assert "odd.dcm: The Study Instance UID is not a valid DICOM UID" in result.stdout
