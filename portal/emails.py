"""E-mails are template sets under templates/emails/NAME/: subject.txt, body.txt, body.html.

They are rendered in the request (so a template error shows up there, not in a worker) and sent
by a Celery task after the transaction commits.

- The HTML part extends templates/emails/base.html (one layout: the sending facility's name or
  Relay, one primary button, inline styles, nothing fetched from outside) and is autoescaped.
- The subject and the plain-text part are plain text: rendered without HTML escaping, so a
  sender's message reads "O'Brien <b> & co" there and not "O&#x27;Brien &lt;b&gt; &amp; co".
- Dates are shown in the recipient's time zone, named ("Jan 2, 2027, 11:59 PM MST"). Relay
  keeps no time zone per user or facility, so that is settings.TIME_ZONE unless the caller
  passes one.
"""

from __future__ import annotations

import zoneinfo
from typing import Any

from django.conf import settings
from django.db import transaction
from django.template import Context, engines
from django.template.loader import render_to_string
from django.utils import timezone


def _render_plain(template_name: str, context: dict[str, Any]) -> str:
    """A template rendered as plain text: no HTML escaping of any value."""
    template = engines["django"].get_template(template_name)
    return template.template.render(Context(context, autoescape=False))  # type: ignore[attr-defined]


def email_render(
    name: str, context: dict[str, Any], *, time_zone: str | None = None
) -> tuple[str, str, str]:
    """(subject, text, html) of the e-mail NAME, dates in `time_zone` (an IANA name)."""
    ctx = {"site_url": settings.SITE_URL, **context}
    with timezone.override(zoneinfo.ZoneInfo(time_zone or settings.TIME_ZONE)):
        subject = " ".join(_render_plain(f"emails/{name}/subject.txt", ctx).split())
        text = _render_plain(f"emails/{name}/body.txt", ctx)
        html = render_to_string(f"emails/{name}/body.html", {**ctx, "subject": subject})
    return subject, text, html


def email_queue(
    *, name: str, to: str, context: dict[str, Any], time_zone: str | None = None
) -> None:
    from .tasks import email_send

    subject, text, html = email_render(name, context, time_zone=time_zone)
    transaction.on_commit(lambda: email_send.delay(to=to, subject=subject, text=text, html=html))
