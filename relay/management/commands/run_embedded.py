"""`manage.py run_embedded` (what `make run` ends with): the web server, a Celery worker,
Celery beat and the DICOM gateway on the embedded defaults, in one terminal. Ctrl-C stops every
process it started; if one of them dies, the others are stopped too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Run the web server, a Celery worker and Celery beat until Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000")

    def handle(self, *args: Any, **options: Any) -> None:
        python = sys.executable
        var = str(settings.VAR_DIR)
        commands = {
            "web": [python, "manage.py", "runserver", options["addr"], "--noreload"],
            "worker": [
                python,
                "-m",
                "celery",
                "-A",
                "relay",
                "worker",
                "-Q",
                "quick,slow",
                "-c",
                "2",
                "-l",
                "INFO",
            ],
            # Rendering has its own worker, under a memory cap, so a hostile file cannot take
            # e-mail and sharing down with it.
            "render": [
                python,
                "-m",
                "celery",
                "-A",
                "relay",
                "worker",
                "-Q",
                "render",
                "-c",
                "1",
                "-n",
                "render@%h",
                "--max-memory-per-child",
                "1500000",
                "-l",
                "INFO",
            ],
            "beat": [
                python,
                "-m",
                "celery",
                "-A",
                "relay",
                "beat",
                "-l",
                "INFO",
                "--schedule",
                f"{var}/celerybeat-schedule",
            ],
            "gateway": [python, "manage.py", "dicom_gateway"],
        }
        children: dict[str, subprocess.Popen[bytes]] = {}
        stopping = False

        def stop(*_: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        for name, command in commands.items():
            # Own process group each, so a stop reaches everything a child started.
            env = {**os.environ, "RELAY_WORKER_MEMORY_MB": "2048"} if name == "render" else None
            children[name] = subprocess.Popen(command, start_new_session=True, env=env)  # noqa: S603
        self.stdout.write(
            f"Relay is starting on http://{options['addr']}/  (Ctrl-C stops everything)"
        )
        self.stdout.write(
            f"DICOM gateway on {settings.DICOM_GATEWAY_BIND}:{settings.DICOM_GATEWAY_PORT}"
            " (call it by a facility's AE title)"
        )
        self.stdout.write(
            f"E-mail goes to {getattr(settings, 'EMAIL_FILE_PATH', None) or settings.EMAIL_HOST}"
        )
        exit_code = 0
        try:
            while not stopping:
                for name, child in children.items():
                    if child.poll() is not None:
                        self.stderr.write(
                            f"{name} exited with {child.returncode}; stopping the others."
                        )
                        stopping, exit_code = True, 1
                time.sleep(0.5)
        finally:
            for child in children.values():
                if child.poll() is None:
                    # The leader only: Celery shuts its own pool down cleanly on SIGTERM.
                    child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for child in children.values():
                try:
                    child.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
            self.stdout.write("Relay stopped.")
        sys.exit(exit_code)
