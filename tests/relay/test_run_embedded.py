"""`manage.py run_embedded` with the database unavailable: it starts anyway, says why (the error
and DATABASE_URL, never the password), serves 503, starts a process that stops again instead of
stopping everything, and says when the database is back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = [pytest.mark.peer, pytest.mark.slow]  # real Celery workers, beat, gateway, web


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Embedded:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, port: int) -> None:
        self.process, self.log, self.port = process, log, port

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while text not in self.output():
            assert self.process.poll() is None, f"run_embedded stopped:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()[-4000:]}"
            time.sleep(0.2)

    def get(self, path: str, seconds: float = 60) -> int:
        """The status of the web server's answer, once it answers."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:  # noqa: S310
                    return int(r.status)
            except urllib.error.HTTPError as error:
                return int(error.code)
            except OSError:
                assert self.process.poll() is None, f"run_embedded stopped:\n{self.output()}"
                assert time.monotonic() < deadline, f"the site never answered:\n{self.output()}"
                time.sleep(0.3)

    def child(self, word: str) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children():
            if word in " ".join(child.cmdline()):
                return child
        raise AssertionError(f"no {word} process")


@contextmanager
def run_embedded(tmp_path: Path, database_url: str) -> Iterator[Embedded]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RELAY_BROKER_DIR")}
    env.update(
        DATABASE_URL=database_url,
        RELAY_VAR_DIR=str(tmp_path / "var"),
        DICOM_GATEWAY_PORT=str(_free_port()),
        DJANGO_SETTINGS_MODULE="relay.settings",
    )
    env.pop("DICOM_TLS_CERTIFICATE", None)
    log = tmp_path / "run_embedded.log"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "run_embedded", "--addr", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield Embedded(process, log, port)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _started_again(embedded: Embedded, before: psutil.Process) -> bool:
    try:
        return embedded.child(" beat ").pid != before.pid
    except AssertionError:
        return False


def test_it_starts_and_names_the_database_error_when_the_database_is_down(tmp_path: Path) -> None:
    db_port = _free_port()  # nothing listens there
    url = f"postgres://relay:not-for-the-log@127.0.0.1:{db_port}/relay"
    with run_embedded(tmp_path, url) as embedded:
        embedded.wait_for("The database is unavailable")
        assert embedded.get("/accounts/login/") == 503
        output = embedded.output()
        assert f"DATABASE_URL: postgresql://127.0.0.1:{db_port}/relay" in output
        assert "Connection refused" in output
        assert "not-for-the-log" not in output
        embedded.wait_for("celery@")  # the worker is up too

        # A process that stops meanwhile is started again (and again); nothing else is stopped.
        for wait in (2, 4):
            beat = embedded.child(" beat ")
            beat.send_signal(signal.SIGKILL)
            embedded.wait_for(
                f"beat exited with -9 while the database is unavailable; starting it again in"
                f" {wait} s."
            )
            deadline = time.monotonic() + 30
            while not _started_again(embedded, beat):
                assert time.monotonic() < deadline, embedded.output()
                time.sleep(0.3)
        assert embedded.process.poll() is None
        assert embedded.get("/accounts/login/") == 503

        embedded.process.send_signal(signal.SIGINT)
        assert embedded.process.wait(timeout=30) == 0
    assert "Relay stopped." in embedded.output()


def test_it_says_when_the_database_is_back(tmp_path: Path) -> None:
    folder = tmp_path / "not-yet"
    with run_embedded(tmp_path, f"sqlite:///{folder / 'relay.sqlite3'}") as embedded:
        embedded.wait_for("The database is unavailable: unable to open database file")
        assert embedded.get("/accounts/login/") == 503
        folder.mkdir()  # SQLite can make its file now
        embedded.wait_for("The database is available again", seconds=30)
        assert embedded.process.poll() is None
