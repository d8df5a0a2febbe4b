"""Relay as several nodes, started from the production guide's own files (README: Production).

The units in deploy/systemd, the environment file deploy/relay.env.example and the nginx site
deploy/nginx/relay.conf are read and run as they stand; only what names a machine is rewritten
for loopback (addresses, ports, certificate paths, the checkout's folder). So a guide command
that stops working fails the multi-node test, and the guide cannot rot.

The set-up (`Cluster`):
- nginx terminating TLS in front of two web nodes (gunicorn, `relay-web.service`),
- a main worker node (`relay-worker.service`) and a render worker node
  (`relay-worker-render.service`), beat (`relay-beat.service`) and the DICOM gateway
  (`relay-gateway.service`),
- one PostgreSQL database of its own on the machine's server, Redis (cache; broker unless
  RabbitMQ is asked for: then a virtual host of its own on the machine's RabbitMQ), images in a
  bucket on moto's S3 server, e-mail into an SMTP server on loopback.

Every node has its own working folder (RELAY_VAR_DIR) and nothing on a shared disk: the nodes
share only the database, the broker and the bucket, as separate hosts would.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the guide's files ------------------------------------------------------------------------


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments and blanks skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


@dataclass(frozen=True)
class Unit:
    name: str
    exec_start_pre: list[str]
    exec_start: str
    environment: dict[str, str]
    kill_signal: str


def unit(name: str) -> Unit:
    """One of deploy/systemd's units, with the lines the harness runs."""
    pre: list[str] = []
    start = ""
    environment: dict[str, str] = {}
    kill = "SIGTERM"
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStartPre":
            pre.append(value)
        elif key == "ExecStart":
            start = value
        elif key == "Environment":
            k, _, v = value.partition("=")
            environment[k] = v
        elif key == "KillSignal":
            kill = value
    assert start, f"{name} has no ExecStart"
    return Unit(name, pre, start, environment, kill)


def command_line(line: str, env: dict[str, str]) -> list[str]:
    """A unit's command as systemd runs it: ${VAR} from the environment, %% for %, and the
    installation folder /opt/relay (with its .venv) mapped onto this checkout."""

    def variable(match: re.Match[str]) -> str:
        return env[match.group(1)]

    line = re.sub(r"\$\{(\w+)\}", variable, line).replace("%%", "%")
    words = shlex.split(line)
    if words[0].startswith("/opt/relay/.venv/bin/"):
        words[0] = str(BIN / words[0].rsplit("/", 1)[1])
    return words


def nginx_site(*, listen: int, upstreams: list[int], certificate: Path, key: Path) -> str:
    """deploy/nginx/relay.conf for loopback: the TLS server on `listen`, the web nodes on
    `upstreams`, the test's certificate; the port-80 redirect server is dropped (it needs root's
    port), everything else is the file as it stands."""
    site = (DEPLOY / "nginx" / "relay.conf").read_text()
    servers = "\n".join(
        f"    server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;" for port in upstreams
    )
    site, count = re.subn(r"(?m)^    server 10\.0\.0\.\d+:8000 [^\n]*\n", "", site)
    assert count == 2, "the guide's upstream lists two web nodes"
    assert upstreams
    site = site.replace("    keepalive 16;", servers + "\n    keepalive 16;")
    site, count = re.subn(r"server \{\n    listen 80;.*?\n\}\n", "", site, flags=re.S)
    assert count == 1
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{listen} ssl http2;")
    site = site.replace("/etc/ssl/relay/fullchain.pem", str(certificate))
    site = site.replace("/etc/ssl/relay/privkey.pem", str(key))
    site = site.replace("server_name relay.example.org;", "server_name localhost;")
    return site


# --- the parts --------------------------------------------------------------------------------


class Inbox:
    """aiosmtpd handler keeping every message."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:  # noqa: N802
        self.messages.append(BytesParser(policy=default_policy).parsebytes(envelope.content))
        return "250 Message accepted for delivery"


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _wait_http(url: str, process: Process, *, context: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{process.name} did not answer {url}:\n{process.tail()}")


def _wait_port(port: int, process: Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{process.name} did not listen on {port}:\n{process.tail()}")


def database_create(server_url: str, name: str) -> str:
    """A new empty database on the PostgreSQL server of `server_url`; its URL."""
    parts = urlsplit(server_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    subprocess.run(["psql", admin, "-qc", f'CREATE DATABASE "{name}"'], check=True)  # noqa: S607
    return urlunsplit(parts._replace(path=f"/{name}"))


def database_drop(url: str) -> None:
    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    name = parts.path.lstrip("/")
    subprocess.run(  # noqa: S603
        ["psql", admin, "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],  # noqa: S607
        check=False,
        capture_output=True,
    )


def _rabbitmq_vhost(name: str, *, create: bool) -> None:
    verb = "add_vhost" if create else "delete_vhost"
    subprocess.run(["rabbitmqctl", "-q", verb, name], check=create, capture_output=True)  # noqa: S603,S607
    if create:
        subprocess.run(  # noqa: S603
            ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],  # noqa: S607
            check=True,
            capture_output=True,
        )


def certificate_make(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (openssl), as the proxy's TLS certificate."""
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    subprocess.run(  # noqa: S603
        [  # noqa: S607
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@dataclass
class Cluster:
    """The running set-up; see the module's docstring."""

    tmp: Path
    broker: str
    database_url: str
    redis_db: int
    s3_endpoint: str
    bucket: str
    inbox: Inbox
    s3_pid: int = 0
    url: str = ""
    certificate: Path = Path()
    web_ports: dict[str, int] = field(default_factory=dict)
    gateway_port: int = 0
    processes: dict[str, Process] = field(default_factory=dict)
    base_env: dict[str, str] = field(default_factory=dict)

    # -- environment

    def env(self, node: str, unit_env: dict[str, str] | None = None) -> dict[str, str]:
        """What a unit on `node` sees: the guide's environment file with this set-up's
        addresses, and the node's own working folder."""
        env = {**self.base_env, **(unit_env or {})}
        env["RELAY_VAR_DIR"] = str(self.var(node))
        if node in self.web_ports:
            env["RELAY_WEB_BIND"] = f"127.0.0.1:{self.web_ports[node]}"
        return env

    def var(self, node: str) -> Path:
        return self.tmp / node / "var"

    def manage(self, node: str, *args: str, check: bool = True) -> str:
        """`manage.py ARGS` run on `node`, as an operator would there; its output."""
        return self._command(node, [str(BIN / "python"), "manage.py", *args], check=check)

    def celery(self, node: str, *args: str) -> str:
        """`celery -A relay ARGS` run on `node` (`call` queues a task by name)."""
        return self._command(node, [str(BIN / "celery"), "-A", "relay", *args], check=True)

    def _command(self, node: str, argv: list[str], *, check: bool) -> str:
        done = subprocess.run(  # noqa: S603
            argv,
            cwd=ROOT,
            env=self.env(node),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[1:])} on {node}:\n{done.stdout}{done.stderr}")
        return done.stdout + done.stderr

    def bucket_keys(self, prefix: str = "") -> list[str]:
        """Every object name in the bucket under `prefix` (what the operator's S3 tools list)."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="cluster",
            aws_secret_access_key="cluster",  # noqa: S106 - moto's, on loopback
        )
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    # -- processes

    def start_unit(self, node: str, name: str) -> Process:
        spec = unit(name)
        env = self.env(node, spec.environment)
        self.var(node).mkdir(parents=True, exist_ok=True)
        log = self.tmp / node / f"{name}.log"
        for line in spec.exec_start_pre:
            done = subprocess.run(  # noqa: S603
                command_line(line, env), cwd=ROOT, env=env, capture_output=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"{name} ExecStartPre: {done.stdout!r} {done.stderr!r}")
        with log.open("ab") as out:
            popen = subprocess.Popen(  # noqa: S603
                command_line(spec.exec_start, env),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = Process(f"{node}:{name}", popen, log)
        self.processes[node] = process
        return process

    def stop(self, node: str, *, kill: bool = False) -> None:
        """Stop a node's process as systemd would (its KillSignal, then SIGKILL after a
        while), or kill it outright."""
        process = self.processes.pop(node, None)
        if process is None or process.popen.poll() is not None:
            return
        os.killpg(process.popen.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait()
        if not kill:  # the group's children (pool processes) left behind by a master
            try:
                os.killpg(process.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def web_start(self, node: str) -> None:
        process = self.start_unit(node, "relay-web.service")
        _wait_http(f"http://127.0.0.1:{self.web_ports[node]}/health/live/", process)

    def logs(self) -> str:
        return "\n".join(
            f"--- {process.name}\n{process.tail(2500)}" for process in self.processes.values()
        )

    # -- talking to it

    def served_by(self) -> list[tuple[str, str, str]]:
        """(method, path, node) of every request the balancer passed on, from its access log."""
        nodes = {f"127.0.0.1:{port}": node for node, port in self.web_ports.items()}
        served = []
        for line in (self.tmp / "nginx" / "logs" / "access.log").read_text().splitlines():
            method, path, _, upstream = line.split(" ", 3)
            served.append((method, path, nodes.get(upstream.split(",")[-1].strip(), upstream)))
        return served

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certificate))


def _redis_flush(db: int) -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()


@contextmanager
def cluster_running(
    tmp: Path,
    *,
    database_server_url: str,
    broker: str = "redis",
    redis_db: int = 13,
    web_nodes: int = 2,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Everything in the module's docstring, started; stopped and removed on leaving.
    `web_nodes` behind the balancer (the load test compares one with two); `extra_env` is added
    to every node's environment."""
    from aiosmtpd.controller import Controller

    name = f"relay_cluster_{secrets.token_hex(4)}"
    database_url = database_create(database_server_url, name)
    vhost = f"relay-cluster-{secrets.token_hex(4)}"
    if broker == "rabbitmq":
        _rabbitmq_vhost(vhost, create=True)
    _redis_flush(redis_db)
    inbox = Inbox()
    smtp_port = free_port()
    smtp = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    s3_port = free_port()
    (tmp / "s3").mkdir(parents=True)
    s3 = Process(
        "s3",
        subprocess.Popen(  # noqa: S603
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=(tmp / "s3" / "moto.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
        tmp / "s3" / "moto.log",
    )
    cluster = Cluster(
        tmp=tmp,
        broker=broker,
        database_url=database_url,
        redis_db=redis_db,
        s3_endpoint=f"http://127.0.0.1:{s3_port}",
        bucket="relay-images",
        inbox=inbox,
        s3_pid=s3.popen.pid,
    )
    nginx: subprocess.Popen[bytes] | None = None
    try:
        _wait_port(s3_port, s3)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=cluster.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="cluster",
            aws_secret_access_key="cluster",  # noqa: S106 - moto's, on loopback
        ).create_bucket(Bucket=cluster.bucket)

        lb_port = free_port()
        cluster.url = f"https://localhost:{lb_port}"
        cluster.web_ports = {name: free_port() for name in ("web-a", "web-b")[:web_nodes]}
        cluster.gateway_port = free_port()
        env = {
            key: os.environ[key] for key in ("PATH", "LANG", "HOME", "TMPDIR") if key in os.environ
        }
        env.update(env_file(DEPLOY / "relay.env.example"))
        env.update(
            SECRET_KEY=secrets.token_urlsafe(48),
            SITE_URL=cluster.url,
            ALLOWED_HOSTS="localhost",
            RELAY_TRUSTED_PROXIES="127.0.0.1",
            DATABASE_URL=database_url,
            REDIS_URL=f"redis://127.0.0.1:6379/{redis_db}",
            S3_BUCKET=cluster.bucket,
            S3_REGION="us-east-1",
            S3_ENDPOINT_URL=cluster.s3_endpoint,
            S3_ACCESS_KEY_ID="cluster",
            S3_SECRET_ACCESS_KEY="cluster",  # noqa: S106 - moto's, on loopback
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(smtp_port),
            EMAIL_HOST_USER="",
            EMAIL_HOST_PASSWORD="",
            EMAIL_USE_TLS="0",
            RELAY_WEB_WORKERS="2",
            DICOM_GATEWAY_BIND="127.0.0.1",
            DICOM_GATEWAY_PORT=str(cluster.gateway_port),
            DICOM_GATEWAY_PROCESSES="1",
            RELAY_HEALTH_GATEWAYS=f"127.0.0.1:{cluster.gateway_port}",
            # Studies sent by C-STORE complete after 2 quiet seconds, not 5 minutes.
            RELAY_STUDY_QUIET_SECONDS="2",
            DJANGO_SETTINGS_MODULE="relay.settings",
        )
        env.update(extra_env or {})
        if broker == "rabbitmq":
            env["RELAY_BROKER_URL"] = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        cluster.base_env = env

        # The guide's once-per-release steps, from one node.
        cluster.manage("web-a", "migrate", "--noinput")
        cluster.manage("web-a", "check", "--deploy", "--fail-level", "ERROR")

        for node in cluster.web_ports:
            cluster.web_start(node)
        cluster.start_unit("worker-a", "relay-worker.service")
        cluster.start_unit("worker-b", "relay-worker-render.service")
        cluster.start_unit("beat", "relay-beat.service")
        gateway = cluster.start_unit("gateway", "relay-gateway.service")
        _wait_port(cluster.gateway_port, gateway)

        cert, key = certificate_make(tmp)
        cluster.certificate = cert
        proxy = tmp / "nginx"
        (proxy / "logs").mkdir(parents=True)
        site = nginx_site(
            listen=lb_port, upstreams=list(cluster.web_ports.values()), certificate=cert, key=key
        )
        (proxy / "relay.conf").write_text(site)
        (proxy / "nginx.conf").write_text(
            f"worker_processes 1;\nerror_log {proxy}/logs/error.log;\npid {proxy}/nginx.pid;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            "  log_format relay '$request_method $uri $status $upstream_addr';\n"
            f"  access_log {proxy}/logs/access.log relay;\n"
            + "".join(
                f"  {kind}_temp_path {proxy}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f"  include {proxy}/relay.conf;\n}}\n"
        )
        nginx_log = proxy / "logs" / "nginx.out"
        nginx = subprocess.Popen(  # noqa: S603
            [  # noqa: S607
                "nginx",
                "-p",
                str(proxy),
                "-c",
                str(proxy / "nginx.conf"),
                "-g",
                "daemon off; user root;" if os.geteuid() == 0 else "daemon off;",
            ],
            stdout=nginx_log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cluster.processes["nginx"] = Process("nginx", nginx, nginx_log)
        _wait_http(f"{cluster.url}/health/live/", cluster.processes["nginx"], context=cluster.tls())
        yield cluster
    finally:
        for node in list(cluster.processes):
            cluster.stop(node)
        smtp.stop()
        if s3.popen.poll() is None:
            os.killpg(s3.popen.pid, signal.SIGKILL)
            s3.popen.wait()
        database_drop(database_url)
        if broker == "rabbitmq":
            _rabbitmq_vhost(vhost, create=False)
        _redis_flush(redis_db)
