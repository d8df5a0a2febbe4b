"""`manage.py restore BACKUP [--passphrase-file FILE] [--replace] [--verify-hashes]`: load a
backup into an empty database, then check that the storage holds every object it refers to.

Nothing changes until the whole file is read and checked. A database that already holds tables
is refused unless --replace (which drops everything in it, in the same transaction as the load on
PostgreSQL). A backup taken by a newer Relay (migrations this one does not have) is refused; one
taken by an older Relay loads, and `manage.py migrate` then brings it up to date. Afterwards
every table's rows and the triggers are compared with the backup's manifest, and every image and
report PDF of the inventory is looked for in the storage (with its recorded size;
--verify-hashes reads and hashes each). Missing or different objects are counted here and listed
with their storage keys in a file only the operator may read (the keys hold study UIDs), and the
command exits with status 1. `--check-storage` does only that check again, after the objects
have been put back. The restore is audited (`restore`) in the restored trail.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from relay.backup import (
    BackupError,
    BackupRead,
    StorageCheck,
    backup_read,
    database_describe,
    migration_state,
    passphrase_read,
    problems_file_for,
    restore_audit,
    restore_load,
    settings_summary,
    storage_check,
)

from .backup import size


class Command(BaseCommand):
    help = "Restore a backup into an empty database and check the storage against it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("backup", type=Path, help="the file `manage.py backup` wrote")
        parser.add_argument(
            "--passphrase-file", type=Path, help="the passphrase of an encrypted backup"
        )
        parser.add_argument(
            "--replace",
            action="store_true",
            help="drop everything in the target database first (it is refused otherwise)",
        )
        parser.add_argument(
            "--verify-hashes",
            action="store_true",
            help="read every object and compare its SHA-256 (slow: all the images), not only its size",
        )
        parser.add_argument(
            "--check-storage",
            action="store_true",
            help="do not load anything: only check the storage against the backup's inventory",
        )
        parser.add_argument(
            "--problems-file",
            type=Path,
            help="where to list missing or different objects (default: next to the backup)",
        )

    def handle(self, *args: Any, backup: Path, **options: Any) -> None:
        work = Path(tempfile.mkdtemp(prefix="relay-restore-"))
        try:
            self._restore(backup, work, options)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _restore(self, path: Path, work: Path, options: dict[str, Any]) -> None:
        passphrase = (
            passphrase_read(options["passphrase_file"]) if options["passphrase_file"] else None
        )
        read = backup_read(path, folder=work, passphrase=passphrase)
        manifest = read.manifest
        database = manifest["database"]
        self.stdout.write(
            f"Read {path} ({'encrypted' if read.encrypted else 'not encrypted'}): taken"
            f" {manifest['created_at']} on {manifest.get('host', '?')} from {database['vendor']}"
            f" {database['server_version']}; every part matches its checksum."
        )
        self.stdout.write(f"  SHA-256 {read.sha256}")
        state = migration_state(manifest["migrations"])
        if state.unknown:
            raise BackupError(
                f"The backup was taken by a newer Relay: {len(state.unknown)} of its migrations"
                f" are unknown here ({', '.join(state.unknown[:5])}). Restore it with that"
                " version of Relay or a newer one. Nothing was changed."
            )
        if options["check_storage"]:
            self._storage(read, options)
            return

        loaded = restore_load(read, replace=options["replace"])
        self.stdout.write(
            f"Loaded into the {database_describe()} in {loaded.seconds:.1f} s:"
            f" {loaded.tables} tables, {loaded.rows:,} rows."
        )
        if loaded.count_mismatches or loaded.triggers_missing:
            wrong = [
                f"{t} ({e} rows in the backup, {f} now)" for t, e, f in loaded.count_mismatches
            ]
            wrong += [f"trigger {t} missing" for t in loaded.triggers_missing]
            raise BackupError(
                "The restored database differs from the backup: " + "; ".join(wrong[:10])
            )
        counts = manifest["counts"]
        self.stdout.write(
            f"  Every table holds the rows the backup counted ({counts.get('transfers_study', 0):,}"
            f" studies, {counts.get('portal_auditevent', 0):,} audit events,"
            f" {counts.get('billing_invoice', 0):,} invoices), and its {len(manifest['triggers'])}"
            " triggers (the audit trail's and the invoices' guards) are in place."
        )
        if state.pending:
            self.stdout.write(
                f"  This Relay has {len(state.pending)} migrations the backup has not: run"
                " `manage.py migrate` before starting Relay."
            )
        if database["vendor"] == "postgresql":
            self.stdout.write(
                '  Now make the grants of README "Database roles" again, as after every migrate.'
            )
        check = self._storage(read, options, verdict=False)
        audited = restore_audit(read, check=check)
        if not audited:
            self.stderr.write(
                "The restore could not be audited in the restored trail (run `manage.py migrate`"
                " first); the output above is its record."
            )
        self._verdict(check, loaded=True)

    def _storage(
        self, read: BackupRead, options: dict[str, Any], *, verdict: bool = True
    ) -> StorageCheck:
        inventory = read.manifest["inventory"]
        self.stdout.write(
            f"Checking the {inventory['objects']:,} stored objects of the inventory"
            f" ({size(inventory['bytes'])}) in the {settings_summary()}"
            + (", reading and hashing each ..." if options["verify_hashes"] else " ...")
        )
        check = storage_check(
            read.inventory,
            problems_file=options["problems_file"] or problems_file_for(read.path),
            verify_hashes=options["verify_hashes"],
        )
        if verdict:
            self._verdict(check)
        return check

    def _verdict(self, check: StorageCheck, *, loaded: bool = False) -> None:
        if check.optional_missing:
            self.stdout.write(
                f"  {check.optional_missing:,} disc images are missing: they are made again when"
                " a recipient asks for one."
            )
        if not check.failed:
            self.stdout.write(
                f"  All {check.checked:,} objects are there"
                + (" and match their SHA-256." if check.hashed else " with their recorded size.")
            )
            self.stdout.write(
                "Restore complete." if loaded else "The storage holds every object of the backup."
            )
            return
        found = ", ".join(f"{n:,} {problem}" for problem, n in sorted(check.problems.items()))
        raise CommandError(
            f"The storage lacks objects the database refers to: {found} (of {check.checked:,})."
            f" Their storage keys are listed in {check.problems_file} (readable by you only: the"
            " keys name studies). Put them back from the bucket's versions or the storage backup,"
            " then run `manage.py restore --check-storage` on this backup again."
        )
