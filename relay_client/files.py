"""What to send from a folder or a patient's CD, and what each file is.

A CD written to the IHE PDI profile has a DICOMDIR at its root that lists every image on it;
the disc may also carry a viewer, autorun files and the like, which we should not even look at.
So when a DICOMDIR is there, only the files it references are sent; otherwise every file under
the folder is a candidate. Either way a DICOMDIR itself is an index, never an image to upload:
the server refuses one (transfers/ingest.py, "This is a DICOMDIR ..."), so it is counted and
named in the summary instead of sent.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pydicom

DICOMDIR = "dicomdir"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
PREAMBLE = 128
MAGIC = b"DICM"
# Why a file was left out, as the summary lists it.
OUTSIDE = "a link to a file outside the folder"
NOT_DICOM = "not a DICOM file (no DICM marker)"
EMPTY = "an empty file"
ARCHIVE_INSIDE = "archive, not read: send it on its own (relay send FILE)"
ARCHIVE_SUFFIXES = frozenset({".zip", ".iso"})
ISO_MAGIC_AT = 16 * 2048 + 1  # "CD001" of the first volume descriptor (ISO 9660, 8.1)


@dataclass
class Listing:
    root: Path  # names sent to the server are relative to this folder
    paths: list[Path]
    dicomdir: Path | None = None
    missing: list[str] = field(default_factory=list)  # listed in the DICOMDIR, not on disk
    warnings: list[str] = field(default_factory=list)
    dicomdirs: list[str] = field(default_factory=list)  # names of the indexes found, never sent
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why) left out unread
    # Sending a ZIP or a disc image (archives.py): its members to consider, instead of paths,
    # and the members refused unread (encrypted, a zip bomb), which count against the run.
    archive: Any = None  # an archives.Archive (typed loosely: archives imports this module)
    members: list[Any] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class LocalFile:
    path: Path
    name: str  # relative POSIX path: shown in the summary and sent as X-Filename
    size: int
    is_dicom: bool
    is_dicomdir: bool = False
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    sha256: str | None = None  # stored_sha256(path), once computed
    # For a file inside a ZIP or a disc image: opens the member for reading (`path` is then
    # only a label, the archive's path and the member's name, never opened).
    opener: Callable[[], IO[bytes]] | None = None
    skip_reason: str | None = None  # why a file that is not DICOM is left out, if not NOT_DICOM

    def open(self) -> IO[bytes]:
        return self.path.open("rb") if self.opener is None else self.opener()


def list_files(folder: Path) -> Listing:
    """The files to consider under `folder` (a folder, a mounted CD, a DICOMDIR or one file)."""
    if folder.is_file():
        if _normalise(folder.name) == DICOMDIR:
            return _inside(_from_dicomdir(folder.parent, folder))
        return Listing(root=folder.parent, paths=[folder])
    dicomdir = _find_child(folder, DICOMDIR)
    if dicomdir is not None:
        return _inside(_from_dicomdir(folder, dicomdir))
    listing = Listing(root=folder, paths=[])
    listing.paths = _walk(folder, listing)
    return _inside(listing)


def _inside(listing: Listing) -> Listing:
    """Only files that really are inside the chosen folder: a link on a disc (or a DICOMDIR
    entry) that leads elsewhere on the computer is named and left out, never sent."""
    root = listing.root.resolve()
    kept: list[Path] = []
    for path in listing.paths:
        if path.resolve().is_relative_to(root):
            kept.append(path)
        else:
            listing.skipped.append((relative_name(path, listing.root), OUTSIDE))
    listing.paths = kept
    return listing


def examine(path: Path, root: Path) -> LocalFile:
    """Is it DICOM, and which SOP Instance UID does it carry? Raises OSError if unreadable.

    Only the header is parsed, and only as far as the UIDs, so reading a CD of thousands of
    images costs a few kilobytes per file rather than the images themselves.
    """
    name = relative_name(path, root)
    with path.open("rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        local = examine_stream(fp, path=path, name=name, size=size)
        if not local.is_dicom and size and _looks_like_archive(fp, path):
            # A ZIP or a disc image in the folder: its images are not sent with the folder.
            local.skip_reason = ARCHIVE_INSIDE
        return local


def examine_stream(
    fp: IO[bytes],
    *,
    path: Path,
    name: str,
    size: int,
    opener: Callable[[], IO[bytes]] | None = None,
) -> LocalFile:
    """`examine` for an open file (on disk, or a member of an archive) positioned at its start."""
    head = fp.read(PREAMBLE + len(MAGIC))
    if head[PREAMBLE:] != MAGIC:
        return LocalFile(path, name, size, is_dicom=False, opener=opener)
    fp.seek(0)
    # pydicom warns about every oddity of every file, and converts values lazily, so the
    # values are read inside the filter too; the server is the judge of those oddities.
    # catch_warnings restores the filters after this read, and the uploader reads headers
    # before any upload thread starts, so nothing else in the process is silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(
                fp,
                stop_before_pixels=True,
                specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
            )
            meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
            sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
            uid = str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
            study_uid = str(ds.get("StudyInstanceUID") or "")
        except OSError:
            raise  # the file (or the archive member) could not be read
        except Exception:
            # Unparsable: send it anyway and let the server say what is wrong with it.
            return LocalFile(path, name, size, is_dicom=True, opener=opener)
    return LocalFile(
        path,
        name,
        size,
        is_dicom=True,
        is_dicomdir=sop_class == MEDIA_STORAGE_DIRECTORY,
        sop_instance_uid=uid.strip("\x00 ") or None,
        study_instance_uid=study_uid.strip("\x00 ") or None,
        opener=opener,
    )


def _looks_like_archive(fp: IO[bytes], path: Path) -> bool:
    if path.suffix.lower() in ARCHIVE_SUFFIXES:
        return True
    fp.seek(0)
    if fp.read(4) == b"PK\x03\x04":
        return True
    fp.seek(ISO_MAGIC_AT)
    return fp.read(5) == b"CD001"


def relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


def _walk(root: Path, listing: Listing) -> list[Path]:
    """Every file under `root`; the DICOMDIRs found on the way are counted in `listing`."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # in place, so that os.walk descends in a stable order
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            if _normalise(filename) == DICOMDIR:
                listing.dicomdirs.append(relative_name(path, root))
            else:
                found.append(path)
    return found


def _from_dicomdir(root: Path, dicomdir: Path) -> Listing:
    try:
        # Values are converted lazily: every one used is read inside the filter.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(dicomdir)
            records = ds.get("DirectoryRecordSequence") or []
            file_ids = [record.get("ReferencedFileID") for record in records]
    except Exception as exc:
        # A damaged index should not stop the images on the disc from being sent.
        listing = Listing(root=root, paths=[])
        listing.paths = _walk(root, listing)
        listing.warnings.append(
            f"The DICOMDIR could not be read ({exc}); sending every file instead."
        )
        return listing
    listing = Listing(
        root=root, paths=[], dicomdir=dicomdir, dicomdirs=[relative_name(dicomdir, root)]
    )
    seen: set[Path] = set()
    tree = _Tree()
    for file_id in file_ids:
        if not file_id:
            continue  # patient, study and series records point at no file
        parts = [file_id] if isinstance(file_id, str) else [str(part) for part in file_id]
        path = tree.resolve(root, parts)
        if path is None:
            listing.missing.append("/".join(parts))
        elif path not in seen:
            seen.add(path)
            listing.paths.append(path)
    return listing


def _normalise(name: str) -> str:
    # DICOMDIR file IDs are upper case; a CD mounted on Linux shows lower-case names, and ISO 9660
    # names may carry a version suffix (";1") and a trailing dot.
    return name.split(";")[0].rstrip(".").casefold()


def _find_child(folder: Path, wanted: str) -> Path | None:
    for child in sorted(folder.iterdir()):
        if _normalise(child.name) == wanted and child.is_file():
            return child
    return None


class _Tree:
    """Resolves DICOMDIR file IDs against the disk case-insensitively, listing each folder once."""

    def __init__(self) -> None:
        self._listings: dict[Path, dict[str, str]] = {}

    def resolve(self, root: Path, parts: list[str]) -> Path | None:
        current = root
        for part in parts:
            # An empty or dotted component ("..") normalises to "" and matches nothing, so a
            # crafted DICOMDIR cannot point outside the disc.
            actual = self._listing(current).get(_normalise(part))
            if actual is None:
                return None
            current = current / actual
        return current if current.is_file() else None

    def _listing(self, folder: Path) -> dict[str, str]:
        if folder not in self._listings:
            try:
                names = sorted(entry.name for entry in os.scandir(folder))
            except OSError:
                names = []
            listing: dict[str, str] = {}
            for name in names:
                key = _normalise(name)
                if key:
                    listing.setdefault(key, name)
            self._listings[folder] = listing
        return self._listings[folder]


def stored_sha256(path: Path) -> str:
    """SHA-256 of the file as the server stores it: with a DICOM preamble zeroed."""
    with path.open("rb") as fp:
        return stored_sha256_of(fp)


def stored_sha256_of(fp: IO[bytes]) -> str:
    """`stored_sha256` of an open file (on disk, or a member of an archive), read in chunks."""
    digest = hashlib.sha256()
    head = fp.read(132)
    if head[128:132] == b"DICM":
        head = bytes(128) + head[128:]
    digest.update(head)
    while chunk := fp.read(1024 * 1024):
        digest.update(chunk)
    return digest.hexdigest()
