"""Start and stop the servers under test: Relay on gunicorn, and Orthanc as the reference.

Every server gets fresh state (a temporary directory, and a fresh PostgreSQL database when
DATABASE_URL names one), listens on 127.0.0.1 only, and is stopped by its own process id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
ORTHANC = Path("/usr/sbin/Orthanc")
BENCH_DB = "relay_bench"
START_TIMEOUT_S = 90.0
TASK_RESULT = "BENCH-RESULT "
STOP_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """A server did not start, or a setup step failed; the message carries its log's tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a race is unlikely on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scratch_database_url(name: str) -> str:
    """A throwaway PostgreSQL database called `name` on the server DATABASE_URL names (else
    127.0.0.1:5432 as postgres): never the named database itself, which may hold someone's
    data. The billing and index benchmarks fill and drop theirs."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        url = "postgres://postgres@127.0.0.1:5432/postgres"
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def psql_admin(url: str, statement: str) -> None:
    """One statement (CREATE or DROP DATABASE) through the server's `postgres` database."""
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    subprocess.run(["psql", admin, "-q", "-c", statement], check=True, capture_output=True)


# Run in Relay's environment by scratch_relay_run: Django set up the way manage.py does it, the
# benchmark's own modules importable, then the caller's code, which prints MARK and its JSON.
SCRATCH_PRELUDE = """
import json, sys, django
sys.path.insert(0, "bench")
from relay.embedded import var_prepare
var_prepare()
django.setup()
from dataclasses import asdict
from pathlib import Path
"""


def scratch_relay_run(
    db_name: str,
    code: Callable[[Path], str],
    *,
    mark: str,
    env: dict[str, str] | None = None,
    keep: bool = False,
    reuse: bool = False,
) -> dict[str, Any]:
    """`code(var)` run by Relay's Python on a throwaway PostgreSQL database `db_name` (made
    afresh unless `reuse`, then migrated) with a temporary RELAY_VAR_DIR `var` (images in
    var/media), neither Redis nor a bucket; the JSON it printed after `mark`, with the
    migration's seconds as `migrate_s`. The database is dropped afterwards unless `keep`."""
    url = scratch_database_url(db_name)
    if not reuse:
        psql_admin(url, f"DROP DATABASE IF EXISTS {db_name}")
        psql_admin(url, f"CREATE DATABASE {db_name}")
    var = Path(tempfile.mkdtemp(prefix=f"{db_name}-"))
    environment = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "relay.settings",
        "RELAY_VAR_DIR": str(var),
        "DEBUG": "0",
        **(env or {}),
    }
    for name in ("REDIS_URL", "S3_BUCKET", "MEDIA_ROOT"):
        environment.pop(name, None)
    try:
        started = time.perf_counter()
        subprocess.run(
            [str(PYTHON), "manage.py", "migrate", "--noinput"],
            cwd=REPO, env=environment, check=True, capture_output=True,
        )  # fmt: skip
        migrated = time.perf_counter() - started
        done = subprocess.run(
            [str(PYTHON), "-c", SCRATCH_PRELUDE + code(var)],
            cwd=REPO, env=environment, check=False, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise ServerError(f"{db_name}: the benchmark failed (exit {done.returncode})")
    finally:
        if not keep:
            psql_admin(url, f"DROP DATABASE IF EXISTS {db_name}")
        shutil.rmtree(var, ignore_errors=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith(f"{mark} "))
    result = dict(json.loads(line.removeprefix(f"{mark} ")))
    result["migrate_s"] = round(migrated, 1)
    return result


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def wait_until_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    *,
    headers: dict[str, str] | None = None,
    ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Poll `url` until it answers as `ready` says; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"the server exited with {proc.returncode} while starting:\n{log_tail(log)}"
            )
        try:
            response = httpx.get(url, headers=headers, timeout=5)
            if ready(response):
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise ServerError(f"{url} not ready after {timeout_s:.0f} s ({last}):\n{log_tail(log)}")


def stop_process_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (graceful), then SIGKILL what is left; only this process and its own children."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


# --- database -----------------------------------------------------------------------------------


@dataclass
class Database:
    """Where Relay keeps its rows: a SQLite file in the run's folder, or a fresh PostgreSQL
    database next to the one DATABASE_URL names (never that one: it may hold someone's data)."""

    label: str
    url: str | None  # None: Relay's default SQLite under RELAY_VAR_DIR
    admin_url: str | None = None

    @classmethod
    def from_environment(cls) -> Database:
        url = os.environ.get("DATABASE_URL", "")
        parts = urlsplit(url)
        if parts.scheme in ("postgres", "postgresql", "pgsql"):
            admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
            bench = urlunsplit((parts.scheme, parts.netloc, "/" + BENCH_DB, parts.query, ""))
            return cls(label="PostgreSQL", url=bench, admin_url=admin)
        if url:
            print(
                f"DATABASE_URL scheme {parts.scheme!r} is not PostgreSQL; using a fresh SQLite file."
            )
        return cls(label="SQLite", url=None)

    def _admin(self, statement: str) -> None:
        import psycopg
        from psycopg import sql

        assert self.admin_url is not None
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(BENCH_DB)))

    def reset(self) -> None:
        if self.admin_url is not None:
            # FORCE ends sessions a crashed earlier run may have left behind (PostgreSQL 13+).
            self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            self._admin("CREATE DATABASE {}")

    def drop(self) -> None:
        if self.admin_url is not None:
            self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)")

    def describe_server(self) -> str:
        if self.admin_url is None:
            import sqlite3

            return f"SQLite {sqlite3.sqlite_version}"
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return f"PostgreSQL {row[0] if row else '?'}"


# --- Relay --------------------------------------------------------------------------------------

# The benchmark user's sign-in (for the pages: ZIP download, viewer); a throw-away database.
BENCH_EMAIL = "bench@example.org"
BENCH_PASSWORD = "bench-password-not-secret-1"  # noqa: S105
# The facility's AE title at the gateway (`manage.py dicom_gateway`), given by run.py's DICOM
# sections; Relay's own AE title (the calling title of pushes) stays the default.
BENCH_AE_TITLE = "BENCHGW"

SETUP_SCRIPT = f"""
import json, django
django.setup()
from portal.models import ApiToken, Facility, Membership, User
user = User.objects.create_user(email="{BENCH_EMAIL}", password="{BENCH_PASSWORD}")
facility = Facility.objects.create(
    name="Benchmark General Hospital", slug="bench", ae_title="{BENCH_AE_TITLE}",
    gateway_calling_aes="BENCHSCU ORTHANC", gateway_addresses="127.0.0.1 ::1",
)
Membership.objects.create(user=user, facility=facility, role="sender")
_, raw = ApiToken.issue(user=user, name="benchmark")
print("BENCH-SETUP " + json.dumps({{"token": raw, "facility": facility.slug}}))
"""


class _Server:
    """Started on entering a with-block, always stopped on leaving it; the log's tail is
    printed when the block failed."""

    name = "server"
    proc: subprocess.Popen[bytes] | None
    log: Path

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self.proc is not None:
            print(f"--- {self.name} log (tail) ---\n{log_tail(self.log)}", file=sys.stderr)
        self.stop()


class RelayServer(_Server):
    """Relay on gunicorn with 4 sync workers, as production runs it behind its proxy."""

    name = "Relay"

    def __init__(self, database: Database, workers: int = 4) -> None:
        self.database = database
        self.workers = workers
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.var_dir = self.tmp / "var"
        self.log = self.tmp / "gunicorn.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.facility = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Everything Relay writes goes under the run's folder, whatever the caller's shell has set.
        for name in ("MEDIA_ROOT", "RELAY_BROKER_DIR", "SECRET_KEY", "S3_BUCKET", "DATABASE_URL"):
            env.pop(name, None)
        env.update(
            RELAY_VAR_DIR=str(self.var_dir), DEBUG="0", DJANGO_SETTINGS_MODULE="relay.settings"
        )
        if self.database.url:
            env["DATABASE_URL"] = self.database.url
        return env

    def _run(self, args: list[str], what: str) -> str:
        done = subprocess.run(
            args,
            cwd=REPO,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(
                f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            )
        return done.stdout

    def start(self) -> None:
        self.database.reset()
        self._run([str(PYTHON), "manage.py", "migrate", "--noinput"], "manage.py migrate")
        out = self._run([str(PYTHON), "-c", SETUP_SCRIPT], "creating the benchmark user and token")
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCH-SETUP ")), None)
        if line is None:
            raise ServerError(f"the setup script printed no token:\n{out[-2000:]}")
        setup = json.loads(line.removeprefix("BENCH-SETUP "))
        self.token, self.facility = setup["token"], setup["facility"]
        gunicorn = VENV_BIN / "gunicorn"
        args = [
            str(gunicorn),
            "-c",
            "python:relay.gunicorn_conf",  # as production runs it: preloaded, frozen (README)
            "relay.wsgi:application",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(self.workers),
            "--timeout",
            "300",
            # gunicorn 27 opens a control socket at ~/.gunicorn/gunicorn.ctl by default, one path
            # shared by every gunicorn of the user; keep the benchmark's in its own folder.
            "--control-socket",
            str(self.tmp / "gunicorn.ctl"),
        ]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                args, cwd=REPO, env=self._env(), stdout=log, stderr=subprocess.STDOUT
            )
        wait_until_ready(
            f"{self.base_url}/api/v1/facilities", self.proc, self.log, headers=self.auth_headers
        )
        # gunicorn answers as soon as one worker is up; wait until all of them are forked.
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(psutil.Process(self.proc.pid).children()) < self.workers:
            if time.monotonic() > deadline:
                raise ServerError(
                    f"gunicorn did not start {self.workers} workers:\n{log_tail(self.log)}"
                )
            time.sleep(0.1)
        self.warm_up()

    def warm_up(self, rounds: int = 4) -> None:
        """Have every worker load the URLconf before the clock starts.

        Django imports the URLconf (and with it the views, the ingest code and pydicom) on a
        worker's first request, not at boot: 0.3 s to over 1 s per worker on a small machine.
        That is paid once per worker after each restart, so it is kept out of the ingest
        numbers. Sync workers take one connection at a time, so a few rounds of 2 x workers
        concurrent requests reach every worker in practice.
        """
        url = f"{self.base_url}/api/v1/facilities"
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(2 * self.workers) as pool:
            for _ in range(rounds):
                answers = list(
                    pool.map(
                        lambda _: client.get(url, headers=self.auth_headers),
                        range(2 * self.workers),
                    )
                )
                for answer in answers:
                    if answer.status_code != 200:
                        raise ServerError(
                            f"warm-up answered HTTP {answer.status_code}: {answer.text[:300]}"
                        )

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def upload_url(self) -> str:
        return f"{self.base_url}/api/v1/instances?facility={self.facility}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stored_bytes(self) -> int:
        return folder_bytes(self.var_dir / "media")

    @property
    def media_root(self) -> Path:
        return self.var_dir / "media"

    def task_start(self, name: str, **args: Any) -> subprocess.Popen[str]:
        """Start `bench/inrelay.py NAME` in this server's environment (same database, same
        storage) as a process of its own, so that its memory can be watched; see task_result."""
        return subprocess.Popen(
            [str(PYTHON), str(REPO / "bench" / "inrelay.py"), name, json.dumps(args)],
            cwd=REPO,
            env=self._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def task_result(proc: subprocess.Popen[str], name: str, timeout_s: float = 600) -> Any:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise ServerError(
                f"inrelay {name} took more than {timeout_s:.0f} s:\n{err[-3000:]}"
            ) from None
        line = next((ln for ln in out.splitlines() if ln.startswith(TASK_RESULT)), None)
        if proc.returncode != 0 or line is None:
            raise ServerError(
                f"inrelay {name} failed ({proc.returncode}):\n{out[-1500:]}\n{err[-3000:]}"
            )
        return json.loads(line.removeprefix(TASK_RESULT))

    def task(self, name: str, **args: Any) -> Any:
        """Run one task of bench/inrelay.py in Relay's environment and return its JSON result."""
        return self.task_result(self.task_start(name, **args), name)

    @contextmanager
    def signed_in(self, timeout_s: float = 300) -> Iterator[httpx.Client]:
        """An httpx client signed in as the benchmark user through the login form (session
        cookie), as a browser would be; closed when the with-block ends."""
        with httpx.Client(base_url=self.base_url, timeout=timeout_s) as client:
            page = client.get("/accounts/login/")
            page.raise_for_status()
            match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
            if match is None:
                raise ServerError("the login page has no CSRF token")
            answer = client.post(
                "/accounts/login/",
                data={
                    "login": BENCH_EMAIL,
                    "password": BENCH_PASSWORD,
                    "csrfmiddlewaretoken": match.group(1),
                },
                headers={"Referer": f"{self.base_url}/accounts/login/"},
            )
            if answer.status_code != 302 or "sessionid" not in client.cookies:
                raise ServerError(
                    f"signing in answered HTTP {answer.status_code}: {answer.text[:300]}"
                )
            yield client

    def stop(self) -> None:
        try:
            if self.proc is not None:
                stop_process_tree(self.proc)
        finally:
            try:
                self.database.drop()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)


# --- Orthanc ------------------------------------------------------------------------------------


# Orthanc's DICOMweb plugin (Debian's orthanc-dicomweb): the benchmark's and the tests' peer.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dicomweb_config(relay_url: str = "", token: str = "") -> dict[str, object]:
    """Orthanc settings that load the DICOMweb plugin under /dicom-web/ and, given Relay's
    /dicom-web/ URL and an API token, know Relay as the DICOMweb server "relay"."""
    web: dict[str, object] = {"Enable": True, "Root": "/dicom-web/"}
    if relay_url:
        web["Servers"] = {
            "relay": {
                "Url": relay_url,
                "HttpHeaders": {"Authorization": f"Bearer {token}"},
                "HasDelete": False,
            }
        }
    return {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": web}


class OrthancServer(_Server):
    """Orthanc with its default settings except where it stores and who may connect."""

    name = "Orthanc"

    def __init__(
        self,
        extra_config: dict[str, object] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        # extra_config: settings to try on top of the defaults (not used by run.py).
        self.extra_config = extra_config or {}
        # extra_env: e.g. TCP_NODELAY=1, read by the DCMTK network code inside Orthanc.
        self.extra_env = extra_env or {}
        self.tmp = Path(tempfile.mkdtemp(prefix="orthanc-bench-"))
        self.log = self.tmp / "orthanc.log"
        self.port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def version(self) -> str:
        try:
            return str(httpx.get(f"{self.base_url}/system", timeout=5).json().get("Version", "?"))
        except (httpx.HTTPError, ValueError):
            return "?"

    def start(self) -> None:
        if not ORTHANC.exists():
            raise ServerError(f"{ORTHANC} is missing: install Debian's orthanc package")
        config = {
            "Name": "RelayBench",
            "HttpPort": self.port,
            "DicomPort": self.dicom_port,
            "StorageDirectory": str(self.tmp / "storage"),
            "IndexDirectory": str(self.tmp / "index"),
            # Loopback clients only, no users: the benchmark never leaves 127.0.0.1.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            # No plugins: the Debian package's system plugin folder is not loaded.
            "Plugins": [],
            **self.extra_config,
        }
        config_path = self.tmp / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(ORTHANC), str(config_path)],
                cwd=self.tmp,
                env={**os.environ, **self.extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_ready(f"{self.base_url}/system", self.proc, self.log)

    @property
    def upload_url(self) -> str:
        return f"{self.base_url}/instances"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stored_bytes(self) -> int:
        return folder_bytes(self.tmp / "storage")

    def stop(self) -> None:
        try:
            if self.proc is not None:
                stop_process_tree(self.proc)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --- Relay's DICOM gateway ----------------------------------------------------------------------


class GatewayServer(_Server):
    """`manage.py dicom_gateway` as its own process, on a free port, in a running RelayServer's
    environment (its database and storage): the way `make run` and production start it."""

    name = "Relay DICOM gateway"

    def __init__(self, relay: RelayServer) -> None:
        self.relay = relay
        self.port = free_port()
        self.log = relay.tmp / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(PYTHON),
                    "manage.py",
                    "dicom_gateway",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=REPO,
                env=self.relay._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # Ready when a C-ECHO to the facility's AE title succeeds (also warms the first
        # association's code path, like Relay's HTTP warm-up).
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"the gateway exited with {self.proc.returncode}:\n{log_tail(self.log)}"
                )
            done = echo(BENCH_AE_TITLE, self.port)
            if done.returncode == 0:
                return
            last = (done.stdout + done.stderr)[-300:]
            time.sleep(0.3)
        raise ServerError(f"the gateway did not answer C-ECHO ({last}):\n{log_tail(self.log)}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_tree(self.proc)


def echo(called_ae: str, port: int) -> subprocess.CompletedProcess[str]:
    """dcmtk's echoscu, once."""
    return subprocess.run(
        ["echoscu", "-aet", "BENCHSCU", "-aec", called_ae, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
