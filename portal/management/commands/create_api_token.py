"""`manage.py create_api_token EMAIL [--name NAME]`: print a new API token for scripts."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.models import User
from portal.services import api_token_create


class Command(BaseCommand):
    help = "Create an API token for the user with this e-mail and print it (shown only this once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email")
        parser.add_argument("--name", default="created with manage.py")

    def handle(self, *args: Any, **options: Any) -> None:
        user = User.objects.filter(email__iexact=options["email"], is_active=True).first()
        if user is None:
            raise CommandError(f"No active user with the e-mail {options['email']}.")
        _, raw = api_token_create(user=user, name=options["name"])
        self.stdout.write(raw)
