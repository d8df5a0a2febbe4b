"""`manage.py run_embedded` (what `make run` ends with): the web server, a Celery worker,
Celery beat and the DICOM gateway on the embedded defaults, in one terminal. Ctrl-C stops every
process it started; if one of them dies, the others are stopped too.

An unavailable database does not stop it: it says so (the error and DATABASE_URL, without its
password) and again when the database is back; the web server serves anyway (the site answers
503, relay.unavailable), and a process that exits while the database is unavailable is started
again instead of stopping the others.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser, OutputWrapper
from django.db import DatabaseError, connections


def database_label() -> str:
    """DATABASE_URL as the settings understood it, without user or password."""
    db = settings.DATABASES["default"]
    vendor = str(db["ENGINE"]).rsplit(".", 1)[-1]
    if vendor == "sqlite3":
        return f"sqlite:///{db['NAME']}"
    host = db.get("HOST") or "localhost"
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"{vendor}://{host}{port}/{db['NAME']}"


def database_problem() -> str | None:
    """Why the database cannot be reached now, or None when it can."""
    connection = connections["default"]
    try:
        connection.ensure_connection()
    except DatabaseError as exc:
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    finally:
        connection.close()
    return None


class DatabaseWatch(threading.Thread):
    """Tries the database every few seconds (in its own thread: an unreachable host can take a
    while to fail) and says when it becomes unavailable or available again."""

    def __init__(self, out: OutputWrapper, err: OutputWrapper) -> None:
        super().__init__(name="database-watch", daemon=True)
        self.out, self.err = out, err
        self.problem: str | None = None
        self.checks = 0
        self._wake = threading.Event()
        self._checked = threading.Condition()

    def run(self) -> None:
        while True:
            problem = database_problem()
            if problem and problem != self.problem:
                self.err.write(
                    f"The database is unavailable: {problem} (DATABASE_URL: {database_label()})."
                    " Relay keeps running: the site answers 503 until it is back, and the"
                    " processes below are started again if they stop meanwhile."
                )
            elif self.problem and not problem:
                self.out.write(f"The database is available again ({database_label()}).")
            with self._checked:
                self.problem = problem
                self.checks += 1
                self._checked.notify_all()
            self._wake.wait(3 if problem else 15)
            self._wake.clear()

    def unavailable(self, timeout: float = 15) -> bool:
        """Checks now; a database that does not answer within `timeout` counts as unavailable."""
        with self._checked:
            checks = self.checks
            self._wake.set()
            if not self._checked.wait_for(lambda: self.checks > checks, timeout):
                return True
            return self.problem is not None


class Command(BaseCommand):
    help = "Run the web server, a Celery worker and Celery beat until Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000")

    def handle(self, *args: Any, **options: Any) -> None:
        python = sys.executable
        var = str(settings.VAR_DIR)
        commands = {
            # runserver that also serves while the database is unavailable.
            "web": [python, "manage.py", "runserver_embedded", options["addr"], "--noreload"],
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
        started: dict[str, float] = {}
        waiting: dict[str, float] = {}  # name: when to start it again
        delays: dict[str, float] = dict.fromkeys(commands, 1.0)  # name: its last wait
        stopping = False

        def stop(*_: Any) -> None:
            nonlocal stopping
            stopping = True

        def start(name: str) -> None:
            # Own process group each, so a stop reaches everything a child started.
            env = {**os.environ, "RELAY_WORKER_MEMORY_MB": "2048"} if name == "render" else None
            children[name] = subprocess.Popen(commands[name], start_new_session=True, env=env)  # noqa: S603
            started[name] = time.monotonic()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        watch = DatabaseWatch(self.stdout, self.stderr)
        watch.start()
        watch.unavailable()  # said before anything starts
        for name in commands:
            start(name)
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
                now = time.monotonic()
                for name, child in children.items():
                    if stopping or child.poll() is None:
                        continue
                    if name in waiting:
                        if now >= waiting[name]:
                            del waiting[name]
                            start(name)
                        continue
                    if watch.unavailable():
                        # Probably the database's doing: wait for it rather than stop everything.
                        # Again and again: 2 s, doubling up to 30 s while it keeps stopping soon.
                        delay = 2.0 if now - started[name] > 60 else min(delays[name] * 2, 30.0)
                        delays[name], waiting[name] = delay, now + delay
                        self.stderr.write(
                            f"{name} exited with {child.returncode} while the database is"
                            f" unavailable; starting it again in {delay:.0f} s."
                        )
                        continue
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
