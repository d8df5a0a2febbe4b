"""`manage.py storage_verify [--facility SLUG] [--since DATE]`: the scrub, by hand.

Reads every stored image (of one facility, received since a date) and checks it against the
SHA-256 and size recorded when it arrived; lists stored objects no image refers to. Carries on
an unfinished run of the same scope (`--restart` starts over). Prints the report, e-mails staff
its summary when the run finishes, and exits 1 when anything was missing or damaged.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.models import Facility

from ...integrity import storage_verify, storage_verify_report


class Command(BaseCommand):
    help = "Check stored images against their recorded SHA-256: missing, damaged and extra objects."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--facility", metavar="SLUG", help="only this facility's images")
        parser.add_argument(
            "--since", metavar="YYYY-MM-DD", help="only images received on or after this day"
        )
        parser.add_argument(
            "--restart", action="store_true", help="start a new run instead of carrying one on"
        )
        parser.add_argument(
            "--limit", type=int, help="stop after this many images (the next run carries on)"
        )
        parser.add_argument(
            "--no-email", action="store_true", help="do not e-mail staff the summary"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        facility = None
        if options.get("facility"):
            facility = Facility.objects.filter(slug=options["facility"]).first()
            if facility is None:
                raise CommandError(f"No facility {options['facility']!r}.")
        since = None
        if options.get("since"):
            try:
                since = date.fromisoformat(options["since"])
            except ValueError as exc:
                raise CommandError("--since wants a date as YYYY-MM-DD.") from exc
        run = storage_verify(
            facility=facility,
            since=since,
            restart=bool(options.get("restart")),
            limit=options.get("limit"),
            tell_staff=not options.get("no_email"),
        )
        self.stdout.write(storage_verify_report(run), ending="")
        if run.finished_at is None:
            self.stdout.write("Not finished: run the same command again to carry on.")
        if run.missing or run.corrupt:
            raise CommandError(f"{run.missing} missing and {run.corrupt} damaged image(s)")
