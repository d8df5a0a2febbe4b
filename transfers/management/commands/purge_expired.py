"""`manage.py purge_expired [--dry-run]`: the daily purge, by hand.

Marks lapsed shares expired on their timelines, then deletes the images of studies nobody may
open any more (see transfers/purge.py), printing per study what it freed and the totals. Output
names studies by UUID, facility and date only: no patient information on an operator's terminal.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.template.defaultfilters import filesizeformat

from ...purge import purge_expired
from ...sharing.expiry import shares_mark_expired


def _size(n: int) -> str:
    return f"{filesizeformat(n)} ({n} bytes)".replace("\xa0", " ")


class Command(BaseCommand):
    help = "Delete the images of studies whose shares have all lapsed and whose retention passed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="list what would be purged; change nothing"
        )

    def handle(self, *args: Any, dry_run: bool = False, **options: Any) -> None:
        if not dry_run:
            marked = shares_mark_expired()
            if marked:
                self.stdout.write(f"{marked} share(s) marked expired")
        result = purge_expired(dry_run=dry_run)
        verb = "would purge" if dry_run else "purged"
        for study in result.studies:
            self.stdout.write(
                f"{verb} study {study.uuid} of {study.facility}"
                f" (study date {study.study_date or 'unknown'}):"
                f" {study.objects} object(s), {_size(study.bytes)}"
            )
        self.stdout.write(
            f"{'would free' if dry_run else 'freed'}: {result.studies_purged} study(ies),"
            f" {result.objects_deleted} object(s), {_size(result.bytes_freed)}"
        )
        for uuid, error in result.failed:
            self.stderr.write(f"could not finish study {uuid}: {error} (the next run finishes it)")
        if result.failed:
            raise CommandError(f"{len(result.failed)} study(ies) could not be purged")
