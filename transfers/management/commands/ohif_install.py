"""`manage.py ohif_install [--dir DIR] [--tarball FILE] [--force]`: install the pinned OHIF viewer.

Fetches `@ohif/app` with `npm pack` (the pinned version, checked against its pinned SHA-512),
extracts and rewrites its build for /ohif/ (see transfers/ohif/install.py), and does nothing
when that version is already installed. `make install` runs it when npm is present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...ohif.install import OHIF_VERSION, OhifInstallError, ohif_dir, ohif_install, site_dir


class Command(BaseCommand):
    help = f"Install the OHIF viewer (@ohif/app {OHIF_VERSION}) under /ohif/; needs npm."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dir", type=Path, help="where to install (default: settings.RELAY_OHIF_DIR)"
        )
        parser.add_argument(
            "--tarball", type=Path, help="an already fetched ohif-app-*.tgz instead of npm pack"
        )
        parser.add_argument(
            "--force", action="store_true", help="install again even if this version is there"
        )
        parser.add_argument("--npm", default="npm", help="the npm program (default: npm)")

    def handle(self, *args: Any, **options: Any) -> None:
        base = options["dir"] or ohif_dir()
        try:
            done = ohif_install(
                base=base, npm=options["npm"], force=options["force"], tarball=options["tarball"]
            )
        except OhifInstallError as error:
            raise CommandError(str(error)) from error
        state = "installed" if done else "already installed"
        self.stdout.write(f"OHIF {OHIF_VERSION} {state} in {site_dir(base)}, served at /ohif/")
