"""WSGI entry point for gunicorn and the dev server."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

from relay.embedded import var_prepare

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "relay.settings")
var_prepare()
application = get_wsgi_application()

# Import every view module (and pydicom with them) now rather than on each worker's first
# request, which would otherwise take a second longer than the rest.
get_resolver().url_patterns  # noqa: B018
