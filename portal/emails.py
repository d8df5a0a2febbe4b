"""E-mails are template sets under templates/emails/NAME/: subject.txt, body.txt, body.html.

They are rendered in the request (so a template error shows up there, not in a worker) and sent
by a Celery task after the transaction commits.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction
from django.template.loader import render_to_string


def email_render(name: str, context: dict[str, Any]) -> tuple[str, str, str]:
    ctx = {"site_url": settings.SITE_URL, **context}
    subject = " ".join(render_to_string(f"emails/{name}/subject.txt", ctx).split())
    text = render_to_string(f"emails/{name}/body.txt", ctx)
    html = render_to_string(f"emails/{name}/body.html", ctx)
    return subject, text, html


def email_queue(*, name: str, to: str, context: dict[str, Any]) -> None:
    from .tasks import email_send

    subject, text, html = email_render(name, context)
    transaction.on_commit(lambda: email_send.delay(to=to, subject=subject, text=text, html=html))
