"""Template context: whether OHIF is installed, for the "Open in advanced viewer" buttons.

A callable, so only the pages that ask (the study page, the inbox) read the install's marker.
Patients (patient-link sessions) are not signed-in users and never get it.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from .install import ohif_installed


def ohif(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"ohif_installed": ohif_installed}
