"""`manage.py create_api_token EMAIL [--facility SLUG] [--name NAME] [--read] [--days N]`: print a
new API token for scripts."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.access import facilities_of
from portal.models import ApiToken, TokenAccess, User
from portal.services import ServiceError, api_token_create


class Command(BaseCommand):
    help = "Create an API token for the user with this e-mail and print it (shown only this once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email")
        parser.add_argument("--facility", help="the facility's slug (needed if several)")
        parser.add_argument("--name", default="created with manage.py")
        parser.add_argument("--read", action="store_true", help="read only (no uploads)")
        parser.add_argument("--days", type=int, default=90, choices=ApiToken.LIFETIMES_DAYS)

    def handle(self, *args: Any, **options: Any) -> None:
        user = User.objects.filter(email__iexact=options["email"], is_active=True).first()
        if user is None:
            raise CommandError(f"No active user with the e-mail {options['email']}.")
        facilities = facilities_of(user)
        if options["facility"]:
            facilities = facilities.filter(slug=options["facility"])
        found = list(facilities[:2])
        if len(found) != 1:
            slugs = ", ".join(f.slug for f in facilities_of(user)) or "none"
            raise CommandError(f"Say which facility with --facility (theirs: {slugs}).")
        try:
            _, raw = api_token_create(
                user=user,
                name=options["name"],
                facility=found[0],
                access=TokenAccess.READ if options["read"] else TokenAccess.WRITE,
                days=options["days"],
            )
        except ServiceError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(raw)
