"""`relay send` exit codes: documented in `relay send --help`, and each one what the run did.

0 every DICOM file is on the server; 1 some files were not stored (named in the summary);
2 a usage error; 3 the server was unreachable or unavailable; 4 refused (token, facility);
130 interrupted. A script on a facility PC (a scheduled CD import, say) decides on these.
The cases for 3 and 4 against a live server are in test_server_down.py and test_relay_send.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from relay_client.cli import (
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_NOT_ALL_STORED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    main,
)
from tests.relay_client import test_relay_send as base
from tests.relay_client.test_relay_send import relay_send

dana_token = base.dana_token
nvh = base.nvh
study_folder = base.study_folder
_no_relay_environment = base._no_relay_environment


def test_the_help_lists_every_exit_code() -> None:
    result = subprocess.run(
        [str(base.RELAY), "send", "--help"], capture_output=True, text=True, check=True
    )
    epilog = result.stdout.split("exit codes:\n", 1)[1]
    listed = [int(code) for code in _codes(epilog)]
    assert listed == [0, 1, 2, 3, 4, 130]
    assert listed == list(EXIT_CODES)
    assert (EXIT_OK, EXIT_NOT_ALL_STORED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REFUSED) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert EXIT_INTERRUPTED == 130
    assert "  3    the server was unreachable or unavailable" in epilog
    assert "  4    refused: the token is not valid" in epilog


def _codes(epilog: str) -> list[str]:
    return [line.split()[0] for line in epilog.splitlines() if line[:3].strip().isdigit()]


@pytest.mark.parametrize(
    "args",
    [
        ["send", "FOLDER"],  # no server, no token
        ["send", "FOLDER", "--server", "relay.example.org", "--token", "t"],  # not a URL
        ["send", "missing", "--server", "http://relay.example.org", "--token", "t"],
        ["send", "FOLDER", "--jobs", "0"],
    ],
)
def test_a_usage_error_is_2(args: list[str], tmp_path: Path, capsys) -> None:
    (tmp_path / "FOLDER").mkdir()
    args = [str(tmp_path / a) if a in ("FOLDER", "missing") else a for a in args]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == EXIT_USAGE
    assert "usage: relay send" in capsys.readouterr().err


@pytest.mark.django_db(transaction=True)
def test_a_file_the_server_rejects_is_1_and_a_folder_not_relay_is_2(
    live_server, dana_token, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    (folder / "cut.dcm").write_bytes(data[:-2000])
    code, _, _ = relay_send(capsys, str(folder), "--server", live_server.url, "--token", dana_token)
    assert code == EXIT_NOT_ALL_STORED

    # --server pointing at a web site that is not Relay (a 404 page): fix the command.
    code, _, err = relay_send(
        capsys, str(folder), "--server", f"{live_server.url}/static", "--token", dana_token
    )
    assert code == EXIT_USAGE
    assert "not a Relay answer" in err
