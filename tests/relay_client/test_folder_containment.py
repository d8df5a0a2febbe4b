"""`relay send` sends only what is inside the chosen folder: a symbolic link on a disc (or in a
folder) that leads elsewhere on the computer is named and left out."""

from __future__ import annotations

from pathlib import Path

from relay_client.files import list_files
from tests.helpers import dicom_bytes


def test_a_link_out_of_the_folder_is_named_and_not_sent(tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    (disc / "IMAGES").mkdir(parents=True)
    (disc / "IMAGES" / "IM1").write_bytes(dicom_bytes())
    secret = tmp_path / "elsewhere" / "private.dcm"
    secret.parent.mkdir()
    secret.write_bytes(dicom_bytes())
    (disc / "IMAGES" / "IM2").symlink_to(secret)
    (disc / "home").symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    listing = list_files(disc)
    assert [p.name for p in listing.paths] == ["IM1"]
    assert listing.skipped == [("IMAGES/IM2", "a link to a file outside the folder")]


def test_a_link_that_stays_inside_the_folder_is_sent(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(dicom_bytes())
    (folder / "b.dcm").symlink_to(folder / "a.dcm")
    assert sorted(p.name for p in list_files(folder).paths) == ["a.dcm", "b.dcm"]
