"""The embedded default's e-mail: one file per message under var/mail, readable by its owner
only (the messages hold password-reset, invitation and patient links)."""

from __future__ import annotations

import os
from pathlib import Path

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
