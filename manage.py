#!/usr/bin/env python
"""Django's command-line utility for Relay."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "relay.settings")
    from django.core.management import execute_from_command_line

    from relay.embedded import var_prepare

    # The embedded default's folders and secret, made on first use (settings write nothing).
    var_prepare()
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
