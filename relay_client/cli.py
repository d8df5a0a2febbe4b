"""The `relay` command: `relay send FOLDER` uploads a DICOM folder or a patient's CD to Relay.

FOLDER may also be a ZIP or an ISO 9660 disc image: its members are read straight out of it
(archives.py), and the run is otherwise the same; one that cannot be read stops with exit 2.

One run, top to bottom:
1. ask the server which facilities the token may upload to: a bad token or a wrong --facility
   stops here, before minutes of reading a CD;
2. list the files (the DICOMDIR's references on a CD, else every file under the folder), skip
   what is not DICOM or leads outside the folder, count the DICOMDIRs (indexes, which the
   server refuses, so never sent), and read each file's SOP Instance UID from its header;
3. ask the server which of those UIDs it already stores, and leave those out: a second run of
   the same command sends only what the first did not (resume after a lost connection);
4. announce the rest (SOP Instance UID, SHA-256 and Study Instance UID of each file): their
   studies now wait for every one of them, so that a run that partly fails or is killed never
   gets a study called complete and its recipients told;
5. upload them, several at a time, each as the raw body of one request;
6. send the manifest: every file of the run, the failed ones too, so that the server marks
   complete only the studies that have everything, and keeps the others receiving until a
   next run sends the rest (or the sender completes them without, on the study page); files
   the server rejected are withdrawn from the announcement;
7. print what became of every file, naming the ones left out and why; the exit code says how
   the run ended (EXIT_CODES, also in `relay send --help`).

When the server is unreachable or unavailable, the whole run backs off once (server.Backoff)
and then stops with exit code 3, naming what the server answered.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from . import __version__
from .archives import ArchiveError, list_archive, open_archive
from .files import (
    ARCHIVE_INSIDE,
    EMPTY,
    NOT_DICOM,
    Listing,
    LocalFile,
    examine,
    list_files,
    relative_name,
    stored_sha256_of,
)
from .server import (
    MAX_KNOWN_UIDS,
    MAX_MANIFEST,
    RelayError,
    RelayServer,
    ServerUnavailable,
    Stopped,
)

EXIT_OK = 0
EXIT_NOT_ALL_STORED = 1
EXIT_USAGE = 2  # argparse's own code for a usage error
EXIT_UNAVAILABLE = 3
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130
EXIT_CODES = {
    EXIT_OK: "every DICOM file is on the server (stored now or already there)",
    EXIT_NOT_ALL_STORED: (
        "some files were rejected, in conflict, unreadable or failed (named in\n"
        "the summary); the studies of failed files stay receiving: run the\n"
        "command again"
    ),
    EXIT_USAGE: (
        "usage error: a missing or wrong option, no such FOLDER, a ZIP or disc\n"
        "image that cannot be read (damaged, not one, encrypted), several\n"
        "facilities and no --facility, or --server is not a Relay server"
    ),
    EXIT_UNAVAILABLE: (
        "the server was unreachable or unavailable (connection refused, unknown\n"
        "name, timeout, 5xx) for longer than --retries and --max-wait allow;\n"
        "nothing is lost: run the same command again later"
    ),
    EXIT_REFUSED: (
        "refused: the token is not valid (unknown, revoked, expired) or is\n"
        "read-only, or may not upload to that facility"
    ),
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); run the same command again to send the rest",
}
REFUSED_STATUSES = frozenset({401, 403, 429})
LISTED = 20  # files named per list in the summary; the rest are counted
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # as the server checks them (transfers/ingest.py)


@dataclass
class Tally:
    """What became of each file, by name; `reasons` for the ones the user must look at."""

    stored: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    conflict: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # archive members left unread
    dicomdirs: list[str] = field(default_factory=list)
    unsent: list[str] = field(default_factory=list)  # the run stopped before they went
    announced: bool = False  # the server was told what this run sends: its studies wait
    complete_studies: int = 0
    incomplete_studies: int = 0

    def add(self, name: str, status: str, reason: str = "") -> None:
        if status == "stored":
            self.stored.append(name)
        elif status == "duplicate":
            self.duplicate.append(name)
        elif status == "conflict":
            self.conflict.append((name, reason))
        elif status == "rejected":
            self.rejected.append((name, reason))
        else:
            self.failed.append((name, reason))

    def accounted(self) -> set[str]:
        """Names of the files whose fate is known."""
        return (
            set(self.stored)
            | set(self.known)
            | set(self.duplicate)
            | {name for name, _ in self.conflict + self.rejected + self.failed + self.refused}
        )

    @property
    def all_stored(self) -> bool:
        # A conflict means the server kept a different file under the same UID: this one is
        # not on the server, so it counts against the run like a rejection.
        return not (self.conflict or self.rejected or self.failed or self.refused or self.unsent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Relay desktop uploader: send DICOM studies from a folder or a CD to Relay.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    send = commands.add_parser(
        "send",
        help="upload a folder or a mounted CD",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Upload every DICOM file under FOLDER (or, when FOLDER holds a DICOMDIR, every\n"
            "file it lists) to a Relay server. FOLDER may also be a ZIP or an ISO disc\n"
            "image: the files inside are read from it directly, nothing is extracted.\n"
            "Files that are not DICOM are skipped; files the server already has are not\n"
            "sent again, so running the same command twice resumes an interrupted upload.\n"
            "Every file is announced before any is sent, so a study is complete (and its\n"
            "recipients told) only once all of its files arrived."
        ),
        epilog=(
            "exit codes:\n"
            + "".join(
                f"  {code:<4} " + text.replace("\n", "\n       ") + "\n"
                for code, text in EXIT_CODES.items()
            )
            + "\nA DICOMDIR is the index of a disc, not an image: it is counted in the summary,\n"
            "not sent. When the server is down, the whole run waits (one shared backoff,\n"
            "honouring the server's Retry-After), then stops with exit code 3.\n"
            "\n"
            "Prefer RELAY_TOKEN to --token: other users of the PC can see command lines."
        ),
    )
    send.set_defaults(command_parser=send)
    send.add_argument(
        "folder",
        type=Path,
        metavar="FOLDER",
        help="a folder, a mounted CD, a DICOMDIR, a ZIP or an ISO disc image",
    )
    send.add_argument(
        "--server",
        metavar="URL",
        default=os.environ.get("RELAY_SERVER"),
        help="the Relay server, e.g. https://relay.example.org (default: $RELAY_SERVER)",
    )
    send.add_argument(
        "--token",
        metavar="TOKEN",
        default=os.environ.get("RELAY_TOKEN"),
        help="an API token from your Relay account page (default: $RELAY_TOKEN)",
    )
    send.add_argument(
        "--facility",
        metavar="SLUG",
        help="the facility to upload to; needed only if you send for several",
    )
    send.add_argument(
        "--jobs",
        type=_positive_int,
        default=4,
        metavar="N",
        help="files uploaded at once (default: 4)",
    )
    send.add_argument(
        "--retries",
        type=_non_negative_int,
        default=6,
        metavar="N",
        help=(
            "while the server is unreachable or answers 5xx, how many times the run tries again"
            " before it stops (default: 6)"
        ),
    )
    send.add_argument(
        "--retry-wait",
        type=_non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help=(
            "wait before the first retry, doubled for each next one up to 30 s, or longer if"
            " the server's Retry-After asks (default: 1)"
        ),
    )
    send.add_argument(
        "--max-wait",
        type=_non_negative_float,
        default=300.0,
        metavar="SECONDS",
        help="at most this long waiting for the server in one run, in all (default: 300)",
    )
    send.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parser: argparse.ArgumentParser = args.command_parser  # errors show `relay send` usage
    if not args.server:
        parser.error("say which server to send to: --server URL or RELAY_SERVER")
    if not args.server.startswith(("http://", "https://")):
        parser.error(f"--server must be an http:// or https:// URL, not {args.server!r}")
    if not args.token or not args.token.strip():
        parser.error("give an API token: --token TOKEN or RELAY_TOKEN")
    if not args.folder.exists():
        parser.error(f"{args.folder} does not exist")
    try:
        return send(args)
    except KeyboardInterrupt:
        print("\nInterrupted. Run the same command again to send the rest.", file=sys.stderr)
        return EXIT_INTERRUPTED


def send(args: argparse.Namespace) -> int:
    quiet: bool | None = True if args.quiet else None  # None: bars only on a terminal
    with RelayServer(
        args.server,
        args.token.strip(),
        retries=args.retries,
        retry_wait=args.retry_wait,
        max_wait=args.max_wait,
        connections=args.jobs,
        on_wait=_say_waiting,
    ) as server:
        try:
            slug, name = choose_facility(server, args.facility)
        except RelayError as exc:
            return _stop(exc)

        try:
            listing = _list(args.folder)
        except ArchiveError as exc:
            print(f"relay: {exc}", file=sys.stderr)
            print("relay: nothing was sent.", file=sys.stderr)
            return EXIT_USAGE
        try:
            for warning in listing.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            tally = Tally(
                skipped=list(listing.skipped),
                refused=list(listing.refused),
                dicomdirs=list(listing.dicomdirs),
            )
            files = _examine_all(listing, tally, quiet=quiet)
            if not files and not tally.failed:
                print(f"No DICOM files found in {args.folder}.", file=sys.stderr)
            try:
                to_send = _leave_out_known(server, slug, files, tally)
                to_send = _announce(server, slug, to_send, tally)
                _upload_all(server, slug, to_send, tally, jobs=args.jobs, quiet=quiet)
                _send_manifest(server, slug, files, tally)
            except RelayError as exc:
                done = tally.accounted()
                tally.unsent = [f.name for f in files if f.name not in done]
                print_summary(
                    tally, folder=args.folder, facility=f"{slug} ({name})", out=sys.stdout
                )
                return _stop(exc)
        finally:
            if listing.archive is not None:
                listing.archive.close()
    print_summary(tally, folder=args.folder, facility=f"{slug} ({name})", out=sys.stdout)
    return EXIT_OK if tally.all_stored else EXIT_NOT_ALL_STORED


def _say_waiting(message: str) -> None:
    # Through tqdm, so that a progress bar on the terminal is redrawn below the message.
    tqdm.write(f"relay: {message}", file=sys.stderr)


def choose_facility(server: RelayServer, wanted: str | None) -> tuple[str, str]:
    """The (slug, name) to upload to. Raises RelayError with a message for the user."""
    facilities = server.facilities()  # also the first check of the token
    names = {f["slug"]: f.get("name", "") for f in facilities}
    if wanted:
        if wanted not in names:
            allowed = ", ".join(names) or "none"
            raise RelayError(
                f"You cannot upload to a facility '{wanted}'. With this token you can upload to: {allowed}.",
                status=403,
            )
        return wanted, names[wanted]
    if len(names) == 1:
        slug = next(iter(names))
        return slug, names[slug]
    # None or several: the server's own rule decides, and its answer says what to do about it.
    slug, _ = server.known(None, [])
    return slug, names.get(slug, "")


def _list(folder: Path) -> Listing:
    """What to consider sending: a ZIP's or a disc image's members, or files on disk.
    Raises ArchiveError when FOLDER is an archive that cannot be read."""
    archive = open_archive(folder)
    return list_files(folder) if archive is None else list_archive(archive)


def _examine_all(listing: Listing, tally: Tally, *, quiet: bool | None) -> list[LocalFile]:
    where = "in the archive" if listing.archive is not None else "on the disc"
    for missing in listing.missing:
        tally.add(missing, "failed", f"Listed in the DICOMDIR but not {where}.")
    found: list[LocalFile] = []
    items = listing.members if listing.archive is not None else listing.paths
    for item in tqdm(items, desc="Reading", unit=" files", disable=quiet):
        try:
            if listing.archive is not None:
                local = listing.archive.examine(item)
            else:
                local = examine(item, listing.root)
        except OSError as exc:
            label = item.name if listing.archive is not None else relative_name(item, listing.root)
            tally.add(label, "failed", f"The file could not be read: {exc.strerror or exc}.")
            continue
        if not local.is_dicom:
            why = local.skip_reason or (EMPTY if local.size == 0 else NOT_DICOM)
            tally.skipped.append((local.name, why))
        elif local.is_dicomdir:  # an index of a disc under another name; the server refuses it
            tally.dicomdirs.append(local.name)
        else:
            found.append(local)
    return found


def _leave_out_known(
    server: RelayServer, facility: str, files: list[LocalFile], tally: Tally
) -> list[LocalFile]:
    uids = sorted({f.sop_instance_uid for f in files if f.sop_instance_uid})
    known: dict[str, set[str]] = {}
    # A server that does not answer this within the run's backoff would not take the uploads
    # either: ServerUnavailable stops the run here.
    for start in range(0, len(uids), MAX_KNOWN_UIDS):
        known.update(server.known(facility, uids[start : start + MAX_KNOWN_UIDS])[1])
    to_send = []
    for local in files:
        stored = known.get(local.sop_instance_uid or "")
        if stored is None:
            to_send.append(local)
            continue
        # The same UID with other bytes (a damaged or edited copy) is not "already on the
        # server": it is sent, and the server answers it as a conflict, listed in the summary.
        if stored and not _hash(local, tally):
            continue
        if not stored or local.sha256 in stored:
            tally.known.append(local.name)
        else:
            to_send.append(local)
    return to_send


def _valid_uid(uid: str | None) -> bool:
    return uid is not None and 0 < len(uid) <= 64 and bool(_UID.match(uid))


def _hash(local: LocalFile, tally: Tally) -> bool:
    """Fill in `local.sha256`; False (and the file counted as failed) if it cannot be read."""
    if local.sha256 is None:
        try:
            with local.open() as fp:
                local.sha256 = stored_sha256_of(fp)
        except OSError as exc:
            tally.add(local.name, "failed", f"The file could not be read: {exc.strerror or exc}.")
            return False
    return True


def _announce(
    server: RelayServer, facility: str, files: list[LocalFile], tally: Tally
) -> list[LocalFile]:
    """Tell the server what this run is about to send, so that its studies wait for all of it.
    Returns the files still to send (a file that cannot be read is counted as failed)."""
    readable = [f for f in files if f.sop_instance_uid is None or _hash(f, tally)]
    entries = [
        {
            "sop_instance_uid": str(f.sop_instance_uid),
            "study_instance_uid": str(f.study_instance_uid),
            "sha256": str(f.sha256),
        }
        for f in readable
        # A file without valid UIDs is rejected by the server anyway; nothing to wait for.
        if _valid_uid(f.sop_instance_uid) and _valid_uid(f.study_instance_uid) and f.sha256
    ]
    # Unavailable after the run's backoff: the uploads would fail too; ServerUnavailable stops it.
    for start in range(0, len(entries), MAX_MANIFEST):
        server.announce(facility, entries[start : start + MAX_MANIFEST])
    tally.announced = bool(entries)
    return readable


def _upload_all(
    server: RelayServer,
    facility: str,
    files: list[LocalFile],
    tally: Tally,
    *,
    jobs: int,
    quiet: bool | None,
) -> None:
    if not files:
        return
    lock = threading.Lock()
    with tqdm(
        total=sum(f.size for f in files),
        desc="Uploading",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=quiet,
    ) as bar:

        def progress(n: int) -> None:
            with lock:  # several upload threads report at once
                bar.update(n)

        executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="relay-upload")
        try:
            futures = {
                executor.submit(server.upload, f, facility=facility, progress=progress): f
                for f in files
            }
            for future in as_completed(futures):
                try:
                    answer = future.result()
                except Stopped:
                    continue  # the RelayError that stopped the run comes from another future
                tally.add(futures[future].name, answer.status, answer.reason)
        except BaseException:
            # A bad token, a refused facility or Ctrl-C: the other threads stop too, at once
            # rather than after each has had its own 401.
            server.stop()
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def _send_manifest(
    server: RelayServer, facility: str, files: list[LocalFile], tally: Tally
) -> None:
    """Tell the server every file of this run, the failed ones too, so that it completes only
    the studies that have everything. Files it refused are withdrawn from the announcement."""
    refused = {name for name, _ in tally.rejected} | {name for name, _ in tally.conflict}
    unread = {name for name, _ in tally.failed}
    entries: list[dict[str, str]] = []
    withdraw: list[str] = []
    for f in files:
        if f.sop_instance_uid is None or not _valid_uid(f.sop_instance_uid):
            continue
        if f.name in refused:
            withdraw.append(f.sop_instance_uid)
        elif f.sha256 is not None or (f.name not in unread and _hash(f, tally)):
            entries.append({"sop_instance_uid": f.sop_instance_uid, "sha256": str(f.sha256)})
    if not entries and not withdraw:
        return
    # One request at least, even with nothing but refusals to withdraw.
    for start in range(0, max(len(entries), 1), MAX_MANIFEST):
        try:
            answer = server.manifest(
                facility,
                entries[start : start + MAX_MANIFEST],
                withdraw[:MAX_MANIFEST] if start == 0 else None,
            )
        except ServerUnavailable as exc:
            print(
                f"warning: could not send the manifest ({exc}); the server will complete the "
                "studies once every announced file is stored.",
                file=sys.stderr,
            )
            return
        tally.complete_studies += len(answer.get("complete") or [])
        tally.incomplete_studies += len(answer.get("incomplete") or [])


def print_summary(tally: Tally, *, folder: Path, facility: str, out: TextIO) -> None:
    rows = [
        ("stored", len(tally.stored)),
        ("already on server", len(tally.known)),
        ("duplicate", len(tally.duplicate)),
        ("conflict", len(tally.conflict)),
        ("rejected", len(tally.rejected)),
        ("skipped", len(tally.skipped)),
        ("failed", len(tally.failed)),
    ]
    if tally.refused:
        rows.append(("refused (not read)", len(tally.refused)))
    if tally.unsent:
        rows.append(("not sent", len(tally.unsent)))
    if tally.dicomdirs:
        rows.append(("DICOMDIR (index, not sent)", len(tally.dicomdirs)))
    if tally.complete_studies or tally.incomplete_studies:
        rows.append(("complete studies", tally.complete_studies))
    if tally.incomplete_studies:
        rows.append(("incomplete studies", tally.incomplete_studies))
    print(f"\n{folder} -> {facility}", file=out)
    for label, count in rows:
        print(f"  {label:<26} {count:>6}", file=out)
    for title, items in (
        ("Conflict", tally.conflict),
        ("Rejected", tally.rejected),
        ("Failed", tally.failed),
        ("Refused, not read from the archive", tally.refused),
        ("Skipped", tally.skipped),
        ("Not sent (the run stopped)", [(name, "") for name in tally.unsent]),
        (
            "DICOMDIR (the index of a disc; the server takes the images it lists, not the index)",
            [(name, "") for name in tally.dicomdirs],
        ),
    ):
        _print_names(title, items, out=out)
    archives = sum(1 for _, why in tally.skipped if why == ARCHIVE_INSIDE)
    if tally.all_stored and archives:
        print(
            f"Every DICOM file of the folder is on the server; {archives} archive"
            f"{'s' if archives > 1 else ''} in it (named above) were not read: send each on its "
            "own with relay send FILE.",
            file=out,
        )
    elif tally.all_stored:
        print("Every DICOM file is on the server.", file=out)
    elif tally.unsent:
        files = "file" if len(tally.unsent) == 1 else "files"
        waiting = "; their studies wait for them" if tally.announced else ""
        print(
            f"The run stopped before {len(tally.unsent)} {files} went{waiting}. Run the same "
            "command again to send them; stored files are not sent twice.",
            file=out,
        )
    elif tally.failed and tally.incomplete_studies:
        studies = "study" if tally.incomplete_studies == 1 else "studies"
        files = "file" if len(tally.failed) == 1 else "files"
        print(
            f"{tally.incomplete_studies} {studies} still receiving: {len(tally.failed)} {files} "
            "failed; run relay send again to finish (stored files are not sent twice), or "
            "complete them without the missing images on the study page.",
            file=out,
        )
    elif tally.failed:
        print(
            "Run the same command again to retry the failed files; stored ones are not sent twice.",
            file=out,
        )
    elif tally.refused:
        files = "file" if len(tally.refused) == 1 else "files"
        print(
            f"{len(tally.refused)} {files} in the archive were refused unread (named above, with "
            "the reason); everything else is on the server.",
            file=out,
        )


def _print_names(title: str, items: list[tuple[str, str]], *, out: TextIO) -> None:
    """The first LISTED names (with the reason, if any) and a count of the rest."""
    if not items:
        return
    print(f"{title}:", file=out)
    for name, reason in sorted(items)[:LISTED]:
        print(f"  {name}: {reason}" if reason else f"  {name}", file=out)
    if len(items) > LISTED:
        print(f"  ... and {len(items) - LISTED} more", file=out)


def _stop(exc: RelayError) -> int:
    """Say why the run stopped and what to do; the exit code (EXIT_CODES) for it."""
    print(f"relay: {exc}", file=sys.stderr)
    if isinstance(exc, ServerUnavailable):
        print(
            "relay: nothing is lost: run the same command again later (files already on the "
            "server are not sent twice). If it lasts, check --server and the network, or tell "
            "the server's operator.",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    if exc.status == 401:
        print(
            "relay: create a new token on your Relay account page and pass it with --token or RELAY_TOKEN.",
            file=sys.stderr,
        )
    if exc.status in REFUSED_STATUSES:
        return EXIT_REFUSED
    return EXIT_USAGE


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


if __name__ == "__main__":
    sys.exit(main())
