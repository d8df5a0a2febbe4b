"""`manage.py runserver_embedded`: the web server of `run_embedded`, Django's runserver (as the
installed apps make it: whitenoise, staticfiles) that also starts when the database is down.

runserver checks for unapplied migrations before it serves, and that check dies on an
unreachable database; here it says so and serves anyway, so the site can answer that the database
is unavailable (relay.unavailable) instead of not answering at all.
"""

from __future__ import annotations

from django.core.management import get_commands, load_command_class
from django.db import DatabaseError

_runserver = type(load_command_class(get_commands()["runserver"], "runserver"))


class Command(_runserver):  # type: ignore[valid-type, misc]
    help = "runserver, also when the database is unavailable (used by run_embedded)."

    def check_migrations(self) -> None:
        try:
            super().check_migrations()
        except DatabaseError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.stderr.write(f"Migrations not checked: the database is unavailable ({reason}).")
