"""E-mail without an SMTP server. The embedded default writes one file per message under
var/mail, readable by its owner only (the messages hold password-reset, invitation and patient
links); production refuses to send instead (`UndeliverableEmailBackend`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.backends.filebased import EmailBackend


class PrivateFileEmailBackend(EmailBackend):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # The folder Django made (or one given) kept to its owner too, when it is ours to set.
        try:
            os.chmod(self.file_path, 0o700)  # type: ignore[attr-defined]
        except PermissionError:
            pass

    def open(self) -> bool:
        if self.stream is None:
            path = Path(self._get_filename())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.stream = os.fdopen(fd, "ab")
            return True
        return False


class MailNotConfigured(RuntimeError):
    """Production without an SMTP server: nothing would reach anyone."""


class UndeliverableEmailBackend(BaseEmailBackend):
    """Production (an https:// SITE_URL, DEBUG off) without EMAIL_HOST: every message is
    refused with an error instead of being written to a file on the server, where nobody would
    read the share notices, invitations and password resets. `manage.py check --deploy` says so
    before the first one (relay.E001)."""

    def send_messages(self, email_messages: Any) -> int:
        raise MailNotConfigured(
            "E-mail is not configured: set EMAIL_HOST (and EMAIL_HOST_USER, EMAIL_HOST_PASSWORD)"
            " to the SMTP server; nothing was sent."
        )
