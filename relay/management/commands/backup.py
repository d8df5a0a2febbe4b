"""`manage.py backup DESTINATION [--passphrase-file FILE]`: the database and its storage inventory
in one file (relay/backup.py says what is in it).

DESTINATION is a file name or a folder to name one in (`relay-backup-<UTC time>.tar`, or
`.tar.enc` encrypted). The file is written 0600 and never over an existing one. The images are
not in it: they stay in the storage, backed up by bucket versioning or a sync (README, "Backups
and restore"). The output gives counts, the file's SHA-256 and no patient data; the backup is
audited (`backup`) with the file's name, folder and SHA-256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.template.defaultfilters import filesizeformat

from relay.backup import BackupError, backup_audit, backup_make, passphrase_read


def size(n: int) -> str:
    return str(filesizeformat(n)).replace("\xa0", " ")


class Command(BaseCommand):
    help = "Back up the database and the list of stored objects it refers to, in one file."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("destination", type=Path, help="a new file, or a folder to write it in")
        parser.add_argument(
            "--passphrase-file",
            type=Path,
            help="encrypt with the passphrase in this file (chmod 600; keep a copy apart)",
        )

    def handle(self, *args: Any, destination: Path, **options: Any) -> None:
        try:
            passphrase = (
                passphrase_read(options["passphrase_file"]) if options["passphrase_file"] else None
            )
            made = backup_make(target=destination, passphrase=passphrase)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        backup_audit(made)
        manifest = made.manifest
        counts = manifest["counts"]
        inventory = manifest["inventory"]["by_kind"]
        database = manifest["database"]
        self.stdout.write(
            f"Wrote {made.path} ({size(made.bytes)}, {'encrypted' if made.encrypted else 'NOT encrypted'})"
        )
        self.stdout.write(f"  SHA-256 {made.sha256}")
        self.stdout.write(
            f"  {database['vendor']} {database['server_version']}, taken {manifest['created_at']},"
            f" {len(manifest['migrations'])} migrations applied"
        )
        self.stdout.write(
            "  "
            + ", ".join(
                f"{counts.get(table, 0):,} {label}"
                for table, label in (
                    ("portal_facility", "facilities"),
                    ("portal_user", "users"),
                    ("transfers_study", "studies"),
                    ("transfers_instance", "instances"),
                    ("transfers_share", "shares"),
                    ("portal_auditevent", "audit events"),
                    ("billing_invoice", "invoices"),
                )
            )
        )
        self.stdout.write(
            f"  Inventory: {inventory['instance']['objects']:,} images and"
            f" {inventory['report']['objects']:,} report PDFs"
            f" ({size(inventory['instance']['bytes'] + inventory['report']['bytes'])}) that the"
            f" storage must hold, and {inventory['disc_image']['objects']:,} disc images (made"
            " again on request)"
        )
        self.stdout.write(
            "  The images are not in this file: back the storage up by bucket versioning or a"
            " sync (README, Backups and restore)."
        )
        if not made.encrypted:
            self.stderr.write(
                "Warning: the file is not encrypted and holds every patient's data. Keep it on"
                " encrypted storage, or back up with --passphrase-file."
            )
