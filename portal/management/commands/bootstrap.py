"""`manage.py bootstrap --email EMAIL --facility NAME [--slug SLUG]`: the first operator account
and the first facility of a new installation (README: production set-up).

The account is staff (the admin site: facilities, plans, invoices) and the facility's admin, so
it can invite everyone else from the portal. Its password is asked twice in the terminal (or read
from RELAY_BOOTSTRAP_PASSWORD for an automated install), checked against the password rules, and
never accepted on the command line, where it would stay in the shell's history. The second factor
is set up at the first sign-in, as for every staff account. Once any staff account exists the
command refuses: later accounts come by invitation or from the admin site.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils.text import slugify

from portal.audit import audit_record
from portal.models import AuditAction, Facility, Membership, Role, User

# The variable's name, not a password.
PASSWORD_VARIABLE = "RELAY_BOOTSTRAP_PASSWORD"  # noqa: S105


class Command(BaseCommand):
    help = "Create the first staff account and the first facility (with that account as its admin)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", required=True)
        parser.add_argument("--facility", required=True, help="the facility's name")
        parser.add_argument("--slug", help="the facility's short name in addresses")

    def handle(self, *args: Any, **options: Any) -> None:
        if User.objects.filter(is_staff=True).exists():
            raise CommandError(
                "This installation has a staff account already: invite people from the portal, "
                "or add staff in the admin site."
            )
        email = User.objects.normalize_email(options["email"].strip())
        if "@" not in email:
            raise CommandError(f"'{email}' is not an e-mail address.")
        name = options["facility"].strip()
        slug = options["slug"] or slugify(name)
        if not name or not slug:
            raise CommandError("Give the facility a name (and a slug of letters and digits).")
        if Facility.objects.filter(slug=slug).exists():
            raise CommandError(f"A facility '{slug}' exists already.")
        password = self._password(email)
        with transaction.atomic():
            user = User.objects.create_superuser(email=email, password=password)
            facility = Facility.objects.create(name=name, slug=slug)
            Membership.objects.create(user=user, facility=facility, role=Role.ADMIN)
            audit_record(
                action=AuditAction.MEMBER_JOIN,
                actor=user,
                facility=facility,
                detail={"role": Role.ADMIN, "by": "manage.py bootstrap"},
            )
        self.stdout.write(
            f"Created {email} (staff, admin of {name}). Sign in at {settings.SITE_URL}/accounts/login/;"
            " you will be asked to set up a second factor first."
        )

    def _password(self, email: str) -> str:
        password = os.environ.get(PASSWORD_VARIABLE, "")
        if not password:
            if not sys.stdin.isatty():
                raise CommandError(
                    f"No terminal to ask for the password: set {PASSWORD_VARIABLE} for this run."
                )
            password = getpass.getpass(f"Password for {email}: ")
            if getpass.getpass("The same again: ") != password:
                raise CommandError("The two passwords differ; nothing was created.")
        try:
            validate_password(password, User(email=email))
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages) + " Nothing was created.") from None
        return password
