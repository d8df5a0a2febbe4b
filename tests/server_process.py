"""Relay under gunicorn in a child process, for tests that need what only a real process has:
a database URL of its own (one that is down), or an OS limit (RLIMIT_FSIZE) that must not
touch the test process itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    url: str
    log: Path
    pid: int

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - our loopback URL
                return Answer(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, dict(exc.headers.items()), exc.read())


def database_url_of_this_run() -> str:
    """The URL of the database this test run uses (the test database, on either engine)."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    return f"postgres://{user}{password}@{host}:{db.get('PORT') or 5432}/{db['NAME']}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def relay_environment(
    tmp_path: Path, *, database_url: str, env: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a Relay process of the test's own: its database, var and broker
    folders under `tmp_path`, no shared Redis (tasks go to the private broker folder)."""
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "RELAY_VAR_DIR": str(tmp_path / "var"),
        "RELAY_BROKER_DIR": str(tmp_path / "broker"),
        "SECRET_KEY": settings.SECRET_KEY,
        "LOG_LEVEL": "INFO",
        **(env or {}),
    }
    environment.pop("REDIS_URL", None)
    return environment


def relay_run(
    tmp_path: Path, args: list[str], *, database_url: str, env: dict[str, str] | None = None
) -> str:
    """`python ARGS` in that environment (a manage.py command, a -c script); its output."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, *args],
        cwd=ROOT,
        env=relay_environment(tmp_path, database_url=database_url, env=env),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@contextmanager
def relay_server(
    tmp_path: Path,
    *,
    database_url: str,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
    workers: int = 1,
    control_socket: bool = False,
    args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """gunicorn as production runs it (relay/gunicorn_conf.py), on a free port; `args` are
    more gunicorn options (given last, they win)."""
    port = free_port()
    log = tmp_path / "server.log"
    environment = relay_environment(tmp_path, database_url=database_url, env=env)
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "python:relay.gunicorn_conf",  # as production runs it (README)
                "relay.wsgi",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
                "--timeout",
                "120",
                *(() if control_socket else ("--no-control-socket",)),
                *args,
            ],  # fmt: skip
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,  # noqa: PLW1509 - the limit is the point, set before exec
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield Server(f"http://127.0.0.1:{port}", log, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
