"""Sending the DICOM files inside a ZIP or an ISO 9660 disc image, without extracting them.

`relay send study.zip` and `relay send disc.iso` read each member straight out of the archive,
in chunks: nothing is written to disk and no member is held in memory whole. The rest of a run
is the folder's: the archive's DICOMDIR (at its root, or in the one folder holding everything)
decides what is sent, exactly as on a mounted CD; DICOMDIRs are counted, not sent; non-DICOM
members are skipped and named; hashes, the announcement, the manifest and resume are the same.

An archive is something a stranger may have built to hurt, so:
- member names are labels (shown in the summary and sent as X-Filename), never paths on disk:
  `../../etc/passwd` or `/abs/name` write nothing anywhere;
- a member that claims more than MAX_MEMBER_BYTES, or that would expand more than MAX_RATIO
  times its compressed size past RATIO_FLOOR bytes (a zip bomb), is refused with the reason and
  never read; what is read is bounded by the size the member declares (zipfile stops there and
  checks the CRC; a disc image member may not claim more than the image holds);
- encrypted (password-protected) members are refused: Relay has no password to ask for;
- an archive that cannot be opened at all (not a ZIP or disc image, damaged) raises
  ArchiveError: the run stops with exit code 2 and the reason, never "every file is there".
"""

from __future__ import annotations

import io
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pycdlib
import pydicom
from pycdlib.pycdlibexception import PyCdlibException

from .files import (
    DICOMDIR,
    ISO_MAGIC_AT,
    MAGIC,
    PREAMBLE,
    Listing,
    LocalFile,
    _normalise,
    examine_stream,
)

MAX_MEMBER_BYTES = 4 * 1024**3  # a DICOM file cannot be larger: its lengths are 32-bit
MAX_RATIO = 200  # images compress about 2-10 times, a blank one a few hundred at most
RATIO_FLOOR = 16 * 1024**2  # below this, a high ratio costs nothing worth refusing
MAX_DICOMDIR_BYTES = 64 * 1024**2  # an index of a few thousand records is a few megabytes
CHUNK = 256 * 1024
ENCRYPTED = "encrypted (password-protected): Relay cannot read it; send an unencrypted copy"


class ArchiveError(Exception):
    """The archive as a whole cannot be read: the run stops (exit code 2) with this message."""


class MemberError(OSError):
    """One member cannot be read (damaged data, a wrong CRC, the archive ends too soon): that
    file fails like an unreadable file on disk, the others go on."""


@dataclass
class Member:
    name: str  # the name inside the archive: a label only, never a path on disk
    size: int  # uncompressed, as the archive declares it
    key: Any  # what the archive needs to open it (a ZipInfo, an ISO path)
    refused: str | None = None  # why it is not read at all


class Archive:
    """A ZIP or a disc image, open for the run. Members are opened one at a time per thread."""

    kind = "archive"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.members: list[Member] = []

    def open_member(self, member: Member) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def examine(self, member: Member) -> LocalFile:
        """`files.examine` for a member: reads its header only. Raises OSError if unreadable."""
        with self.open_member(member) as fp:
            return examine_stream(
                fp,
                path=self.path / member.name,
                name=member.name,
                size=member.size,
                opener=lambda: self.open_member(member),
            )


class ZipArchive(Archive):
    kind = "ZIP"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            raise ArchiveError(
                f"{path.name} cannot be read as a ZIP archive: {_why(exc)}. Is it damaged, "
                "or not a ZIP file?"
            ) from exc
        for info in infos:
            if info.is_dir():
                continue
            self.members.append(Member(info.filename, info.file_size, info, _zip_refusal(info)))
        files = [m for m in self.members if m.size]
        if files and all(m.refused == ENCRYPTED for m in files):
            self._zip.close()
            raise ArchiveError(f"{path.name} is {ENCRYPTED}.")

    def open_member(self, member: Member) -> IO[bytes]:
        try:
            raw = self._zip.open(member.key)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError) as exc:
            raise MemberError(f"it cannot be read from {self.path.name}: {_why(exc)}") from exc
        return _bounded(raw, member, self.path.name)

    def close(self) -> None:
        self._zip.close()


class DiscImage(Archive):
    kind = "disc image"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._iso = pycdlib.PyCdlib()
        # pycdlib reads every member through the one file object it opened: each read is a seek
        # and a read, which the upload threads take turns at.
        self._lock = threading.Lock()
        image_size = path.stat().st_size
        try:
            self._iso.open(str(path))
            for dirpath, _dirs, filenames in self._iso.walk(iso_path="/"):
                for filename in filenames:
                    iso_path = f"{dirpath.rstrip('/')}/{filename}"
                    size = self._iso.get_record(iso_path=iso_path).get_data_length()
                    label = "/".join(_iso_label(part) for part in iso_path.strip("/").split("/"))
                    refused = None
                    if size > image_size:
                        refused = (
                            f"claims {size:,} bytes, more than the whole disc image holds "
                            f"({image_size:,}): the image is damaged"
                        )
                    self.members.append(Member(label, size, iso_path, refused))
        except (PyCdlibException, OSError, ValueError, EOFError) as exc:
            self.close()
            raise ArchiveError(
                f"{path.name} cannot be read as an ISO 9660 disc image: {_why(exc)}. Is it "
                "damaged, or not a disc image?"
            ) from exc

    def open_member(self, member: Member) -> IO[bytes]:
        with self._lock:
            try:
                raw = self._iso.open_file_from_iso(iso_path=member.key)
                raw.__enter__()
            except (PyCdlibException, OSError) as exc:
                raise MemberError(f"it cannot be read from {self.path.name}: {_why(exc)}") from exc
        return _bounded(raw, member, self.path.name, lock=self._lock)

    def close(self) -> None:
        try:
            self._iso.close()
        except PyCdlibException:
            pass  # never opened


def open_archive(path: Path) -> Archive | None:
    """The archive at `path`, or None when it is not one (a DICOM file, a DICOMDIR, other).

    A file named .zip or .iso that cannot be read as one raises ArchiveError rather than being
    skipped as "not DICOM": the user meant to send what is inside."""
    if not path.is_file():
        return None
    with path.open("rb") as fp:
        head = fp.read(PREAMBLE + len(MAGIC))
        fp.seek(ISO_MAGIC_AT)
        iso_magic = fp.read(5)
    if head[PREAMBLE:] == MAGIC:
        return None  # a DICOM file, whatever its name
    suffix = path.suffix.lower()
    if suffix == ".zip" or head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ZipArchive(path)
    if suffix == ".iso" or iso_magic == b"CD001":
        return DiscImage(path)
    return None


def list_archive(archive: Archive) -> Listing:
    """What to send from the archive: the members its DICOMDIR lists, else every member."""
    listing = Listing(root=archive.path, paths=[], archive=archive)
    usable: list[Member] = []
    for member in archive.members:
        if member.refused:
            listing.refused.append((member.name, member.refused))
        else:
            usable.append(member)
    indexes = [m for m in usable if _normalise(_parts(m.name)[-1]) == DICOMDIR]
    # The DICOMDIR of the whole archive: at its root, or in the one folder that holds every
    # member (a disc zipped with its folder). Several discs zipped together have no such index:
    # every member is then a candidate, as for a folder of several discs.
    chosen = next(
        (m for m in sorted(indexes, key=lambda m: len(_parts(m.name))) if _covers(m, usable)),
        None,
    )
    listing.dicomdirs = sorted(m.name for m in indexes)
    others = [m for m in usable if all(m is not index for index in indexes)]
    if chosen is not None:
        try:
            listed = _listed_in(archive, chosen, others, listing)
        except Exception as exc:  # a damaged index should not stop the images being sent
            listing.warnings.append(
                f"The DICOMDIR {chosen.name} could not be read ({_why(exc)}); sending every file "
                "instead."
            )
        else:
            listing.members = listed
            return listing
    listing.members = others
    return listing


def _listed_in(
    archive: Archive, dicomdir: Member, members: list[Member], listing: Listing
) -> list[Member]:
    if dicomdir.size > MAX_DICOMDIR_BYTES:
        raise ValueError(f"it claims {dicomdir.size:,} bytes, too many for an index")
    with archive.open_member(dicomdir) as fp:
        data = fp.read(MAX_DICOMDIR_BYTES + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        file_ids = [
            record.get("ReferencedFileID") for record in ds.get("DirectoryRecordSequence") or []
        ]
    base = tuple(_normalise(part) for part in _parts(dicomdir.name)[:-1])
    index: dict[tuple[str, ...], Member] = {}
    for member in members:
        key = tuple(_normalise(part) for part in _parts(member.name))
        if all(key):  # "..", "." and empty components match no file ID
            index.setdefault(key, member)
    listed: list[Member] = []
    seen: set[str] = set()
    for file_id in file_ids:
        if not file_id:
            continue  # patient, study and series records point at no file
        parts = [file_id] if isinstance(file_id, str) else [str(part) for part in file_id]
        key = base + tuple(_normalise(part) for part in parts)
        found = index.get(key) if all(key) else None
        if found is None:
            listing.missing.append("/".join(parts))
        elif found.name not in seen:
            seen.add(found.name)
            listed.append(found)
    return listed


def _covers(dicomdir: Member, members: list[Member]) -> bool:
    base = _parts(dicomdir.name)[:-1]
    return all(_parts(m.name)[: len(base)] == base for m in members)


def _zip_refusal(info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & 0x1:
        return ENCRYPTED
    if info.file_size > MAX_MEMBER_BYTES:
        return (
            f"claims {info.file_size:,} bytes uncompressed, more than any DICOM file can be; "
            "not read"
        )
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        return (
            f"would expand {info.compress_size:,} compressed bytes to {info.file_size:,} "
            f"(more than {MAX_RATIO} times, as a zip bomb does, never an image); not read"
        )
    return None


def _bounded(
    raw: Any, member: Member, archive: str, *, lock: threading.Lock | None = None
) -> IO[bytes]:
    return io.BufferedReader(_MemberReader(raw, member, archive, lock), buffer_size=CHUNK)


class _MemberReader(io.RawIOBase):
    """A member's bytes: exactly the size it declares, the archive's errors as MemberError."""

    def __init__(self, raw: Any, member: Member, archive: str, lock: threading.Lock | None) -> None:
        super().__init__()
        self._raw = raw
        self._size = member.size
        self._name = archive
        self._lock = lock
        self._pos = 0
        self.name = member.name  # pydicom labels what it reads with it

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._size - self._pos)
        if wanted <= 0:
            return 0
        data = self._guarded(lambda: self._raw.read(wanted))
        if not data:
            raise MemberError(
                f"{self._name} ends before this file does ({self._pos:,} of {self._size:,} bytes)"
            )
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._guarded(lambda: self._raw.seek(offset, whence))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._guarded(self._raw.close)
        super().close()

    def _guarded(self, call: Callable[[], Any]) -> Any:
        try:
            if self._lock is None:
                return call()
            with self._lock:
                return call()
        except MemberError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, PyCdlibException, OSError) as exc:
            raise MemberError(f"it cannot be read from {self._name}: {_why(exc)}") from exc


def _parts(name: str) -> list[str]:
    return name.replace("\\", "/").split("/")


def _iso_label(part: str) -> str:
    # ISO 9660 names carry a version (";1") and, without an extension, a trailing dot.
    return part.split(";")[0].rstrip(".") or part


def _why(exc: BaseException) -> str:
    return str(exc).strip().rstrip(".") or type(exc).__name__
