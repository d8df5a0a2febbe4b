"""The `relay` command: `relay send FOLDER` uploads a DICOM folder or a patient's CD to Relay.

One run, top to bottom:
1. ask the server which facilities the token may upload to: a bad token or a wrong --facility
   stops here, before minutes of reading a CD;
2. list the files (the DICOMDIR's references on a CD, else every file under the folder), skip
   what is not DICOM, and read each file's SOP Instance UID from its header;
3. ask the server which of those UIDs it already stores, and leave those out: a second run of
   the same command sends only what the first did not (resume after a lost connection);
4. upload the rest, several at a time, each as the raw body of one request;
5. send the manifest (SOP Instance UID and SHA-256 of every file now on the server), so that
   the server marks the studies complete and their recipients are told;
6. print what became of every file. Exit code 0: everything is on the server; 1: some file was
   rejected, in conflict or failed; 2: the run could not start or was stopped (bad token,
   facility, server unreachable); 130: interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from . import __version__
from .files import Listing, LocalFile, examine, list_files, relative_name, stored_sha256
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
EXIT_STOPPED = 2
EXIT_INTERRUPTED = 130


@dataclass
class Tally:
    """What became of each file, by name; `reasons` for the ones the user must look at."""

    stored: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    conflict: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
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

    @property
    def all_stored(self) -> bool:
        # A conflict means the server kept a different file under the same UID: this one is
        # not on the server, so it counts against the run like a rejection.
        return not (self.conflict or self.rejected or self.failed)


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
            "file it lists) to a Relay server. Files that are not DICOM are skipped; files\n"
            "the server already has are not sent again, so running the same command twice\n"
            "resumes an interrupted upload."
        ),
        epilog=(
            "exit codes:\n"
            "  0    every DICOM file is on the server\n"
            "  1    some files were rejected, in conflict or failed (listed in the summary)\n"
            "  2    the run could not start or was stopped: bad token, facility, no server\n"
            "  130  interrupted\n"
            "\n"
            "Prefer RELAY_TOKEN to --token: other users of the PC can see command lines."
        ),
    )
    send.set_defaults(command_parser=send)
    send.add_argument(
        "folder", type=Path, metavar="FOLDER", help="a folder, a mounted CD, or a DICOMDIR"
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
        default=3,
        metavar="N",
        help="retries of a request after a network error or 502/503/504 (default: 3)",
    )
    send.add_argument(
        "--retry-wait",
        type=_non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="wait before the first retry, doubled for each next one (default: 1)",
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
        connections=args.jobs,
    ) as server:
        try:
            slug, name = choose_facility(server, args.facility)
        except RelayError as exc:
            return _stop(exc)

        listing = list_files(args.folder)
        for warning in listing.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        tally = Tally()
        files = _examine_all(listing, tally, quiet=quiet)
        if not files and not tally.failed:
            print(f"No DICOM files found in {args.folder}.", file=sys.stderr)
        try:
            to_send = _leave_out_known(server, slug, files, tally)
            _upload_all(server, slug, to_send, tally, jobs=args.jobs, quiet=quiet)
            _send_manifest(server, slug, files, tally)
        except RelayError as exc:
            print_summary(tally, folder=args.folder, facility=f"{slug} ({name})", out=sys.stdout)
            return _stop(exc)
    print_summary(tally, folder=args.folder, facility=f"{slug} ({name})", out=sys.stdout)
    return EXIT_OK if tally.all_stored else EXIT_NOT_ALL_STORED


def choose_facility(server: RelayServer, wanted: str | None) -> tuple[str, str]:
    """The (slug, name) to upload to. Raises RelayError with a message for the user."""
    facilities = server.facilities()  # also the first check of the token
    names = {f["slug"]: f.get("name", "") for f in facilities}
    if wanted:
        if wanted not in names:
            allowed = ", ".join(names) or "none"
            raise RelayError(
                f"You cannot upload to a facility '{wanted}'. With this token you can upload to: {allowed}."
            )
        return wanted, names[wanted]
    if len(names) == 1:
        slug = next(iter(names))
        return slug, names[slug]
    # None or several: the server's own rule decides, and its answer says what to do about it.
    slug, _ = server.known(None, [])
    return slug, names.get(slug, "")


def _examine_all(listing: Listing, tally: Tally, *, quiet: bool | None) -> list[LocalFile]:
    for missing in listing.missing:
        tally.add(missing, "failed", "Listed in the DICOMDIR but not on the disc.")
    found: list[LocalFile] = []
    for path in tqdm(listing.paths, desc="Reading", unit=" files", disable=quiet):
        try:
            local = examine(path, listing.root)
        except OSError as exc:
            tally.add(
                relative_name(path, listing.root),
                "failed",
                f"The file could not be read: {exc.strerror or exc}.",
            )
            continue
        if not local.is_dicom:
            tally.skipped.append(local.name)
        elif not local.is_dicomdir:  # an index of a disc, not an image; never sent
            found.append(local)
    return found


def _leave_out_known(
    server: RelayServer, facility: str, files: list[LocalFile], tally: Tally
) -> list[LocalFile]:
    uids = sorted({f.sop_instance_uid for f in files if f.sop_instance_uid})
    known: set[str] = set()
    try:
        for start in range(0, len(uids), MAX_KNOWN_UIDS):
            known |= server.known(facility, uids[start : start + MAX_KNOWN_UIDS])[1]
    except ServerUnavailable as exc:
        # Not fatal: the server deduplicates anyway, we just send more than we need to.
        print(
            f"warning: could not ask which files the server has ({exc}); sending them all.",
            file=sys.stderr,
        )
        return files
    to_send = []
    for local in files:
        if local.sop_instance_uid in known:
            tally.known.append(local.name)
        else:
            to_send.append(local)
    return to_send


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
    """Tell the server what is on it now, so it can mark the studies complete."""
    on_server = set(tally.stored) | set(tally.known) | set(tally.duplicate)
    entries = [
        {"sop_instance_uid": f.sop_instance_uid, "sha256": stored_sha256(f.path)}
        for f in files
        if f.name in on_server and f.sop_instance_uid is not None
    ]
    for start in range(0, len(entries), MAX_MANIFEST):
        try:
            answer = server.manifest(facility, entries[start : start + MAX_MANIFEST])
        except ServerUnavailable as exc:
            print(
                f"warning: could not send the manifest ({exc}); the server will complete the studies later.",
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
        ("skipped (not DICOM)", len(tally.skipped)),
        ("failed", len(tally.failed)),
    ]
    print(f"\n{folder} -> {facility}", file=out)
    for label, count in rows:
        print(f"  {label:<20} {count:>6}", file=out)
    for title, items in (
        ("Conflict", tally.conflict),
        ("Rejected", tally.rejected),
        ("Failed", tally.failed),
    ):
        if items:
            print(f"{title}:", file=out)
            for name, reason in sorted(items):
                print(f"  {name}: {reason}", file=out)
    if tally.complete_studies or tally.incomplete_studies:
        print(f"  {'complete studies':<20} {tally.complete_studies:>6}", file=out)
    if tally.incomplete_studies:
        print(f"  {'incomplete studies':<20} {tally.incomplete_studies:>6}", file=out)
    if tally.all_stored:
        print("Every DICOM file is on the server.", file=out)
    elif tally.failed:
        print(
            "Run the same command again to retry the failed files; stored ones are not sent twice.",
            file=out,
        )


def _stop(exc: RelayError) -> int:
    print(f"relay: {exc}", file=sys.stderr)
    if isinstance(exc, ServerUnavailable):
        print(
            "relay: check --server and the network, then run the same command again.",
            file=sys.stderr,
        )
    elif exc.status == 401:
        print(
            "relay: create a new token on your Relay account page and pass it with --token or RELAY_TOKEN.",
            file=sys.stderr,
        )
    return EXIT_STOPPED


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
