"""A task survives the worker that was running it being killed (SIGKILL), on the embedded
default's broker, on RabbitMQ (RELAY_BROKER_URL; the machine's server at 127.0.0.1:5672, a
virtual host of the test's own) and, when this run has REDIS_URL, on Redis.

The task is Relay's own `email_send` (every e-mail goes through it: share notices, invitations),
sent to a real SMTP server on loopback that holds the first message's DATA unanswered: the test
knows the worker is mid-task, kills it there, and then waits for the message to arrive.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiosmtpd.controller import Controller
from django.conf import settings

from portal.tasks import email_send
from relay.celery import app
from tests.helpers import peer_missing, require_peer

ROOT = Path(__file__).resolve().parent.parent
VISIBILITY_TIMEOUT = 4  # seconds; production's is an hour

pytestmark = [pytest.mark.peer, pytest.mark.slow]


class StallingInbox:
    """Keeps every message, but leaves the first one's DATA unanswered until released."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.stalled = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:  # noqa: N802
        if not self.stalled.is_set():
            self.stalled.set()
            while not self.release.is_set():
                await asyncio.sleep(0.05)
            return "451 Try again later"
        self.messages.append(BytesParser(policy=default_policy).parsebytes(envelope.content))
        return "250 Message accepted for delivery"


@pytest.fixture
def inbox() -> Iterator[tuple[StallingInbox, int]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = StallingInbox()
    smtp = Controller(handler, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        yield handler, port
    finally:
        handler.release.set()
        smtp.stop()


def _wait_for(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(what)


class Workers:
    """Starts Celery workers the way production does (prefork, one child) on one broker, and
    points this process's producer at the same broker."""

    def __init__(self, env: dict[str, str], queue: str, logs: Path) -> None:
        self.env, self.queue, self.logs = env, queue, logs
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = self.logs / f"worker-{len(self.processes)}.log"
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "relay", "worker"),
                *("-Q", self.queue, "-c", "1", "-l", "INFO", "--without-mingle"),
                *("-n", f"crash{len(self.processes)}@%h"),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def log(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-3000:] for path in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        # Nothing is left to acknowledge (each test waits for its task) and the queue is the
        # test's own: no need to wait for Celery's warm shutdown.
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _broker_settings(env: dict[str, str]) -> dict[str, Any]:
    """The broker the settings choose in `env`, read the way a worker started there reads them
    (after making the embedded broker's folders, as every Relay process does first)."""
    code = (
        "import json, django; from relay.embedded import var_prepare; var_prepare(); "
        "django.setup(); from django.conf import settings as s; print(json.dumps({"
        "'broker_url': s.CELERY_BROKER_URL, "
        "'broker_transport': getattr(s, 'CELERY_BROKER_TRANSPORT', None), "
        "'broker_transport_options': s.CELERY_BROKER_TRANSPORT_OPTIONS}))"
    )
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, check=True
    )
    return dict(json.loads(result.stdout.decode().strip().splitlines()[-1]))


RABBITMQ = os.environ.get("RELAY_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")

BROKERS = [
    "embedded",
    "rabbitmq",
    pytest.param(
        "redis",
        marks=pytest.mark.skipif(not settings.REDIS_URL, reason="this run has no REDIS_URL"),
    ),
]


def _rabbitmq_vhost_add() -> str:
    """A virtual host of the test's own on the machine's RabbitMQ (queues of other runs stay
    apart). RabbitMQ missing: fail in CI, skip elsewhere."""
    import socket as sockets

    try:
        sockets.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        peer_missing("RabbitMQ is not running on 127.0.0.1:5672")
    require_peer("rabbitmqctl")
    vhost = f"relay-crash-{uuid.uuid4().hex[:8]}"
    for args in (["add_vhost", vhost], ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)  # noqa: S603,S607
    return vhost


@pytest.fixture(params=BROKERS)
def workers(
    request: pytest.FixtureRequest, tmp_path: Path, inbox: tuple[StallingInbox, int]
) -> Iterator[Workers]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "relay.settings",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(inbox[1]),
        "EMAIL_USE_TLS": "0",
        "RELAY_VAR_DIR": str(tmp_path / "var"),
        "RELAY_BROKER_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "SECRET_KEY": settings.SECRET_KEY,
    }
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    env.pop("RELAY_BROKER_DIR", None)
    vhost = ""
    if request.param == "embedded":
        env.pop("REDIS_URL", None)
    elif request.param == "rabbitmq":
        vhost = _rabbitmq_vhost_add()
        env.pop("REDIS_URL", None)
        env["RELAY_BROKER_URL"] = f"{RABBITMQ}/{vhost}"
    else:
        env["REDIS_URL"] = settings.REDIS_URL
    broker = _broker_settings(env)
    saved = {key: app.conf[key] for key in broker}
    app.conf.update(broker)
    # Connections made earlier in this run point at another broker: start afresh.
    app._pool = None
    app.amqp._producer_pool = None
    app.conf.task_always_eager = False
    # A queue of its own, so that no other worker of this run can take the task.
    pool = Workers(env, f"crash-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        yield pool
    finally:
        pool.stop()
        print(pool.log())
        app.conf.update(saved)
        app._pool = None
        app.amqp._producer_pool = None
        app.conf.task_always_eager = True
        if vhost:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)  # noqa: S607


def _send(workers: Workers) -> str:
    to = f"reader-{uuid.uuid4().hex[:8]}@clinic.example"
    email_send.apply_async(
        kwargs={
            "to": to,
            "subject": "A study was shared with you",
            "text": "See Relay.",
            "html": "",
        },
        queue=workers.queue,
    )
    return to


def test_a_task_survives_its_whole_worker_being_killed(
    workers: Workers, inbox: tuple[StallingInbox, int]
) -> None:
    handler = inbox[0]
    first = workers.start()
    to = _send(workers)
    _wait_for(handler.stalled.is_set, 60, f"the worker never started the task\n{workers.log()}")
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool: nothing can acknowledge
    first.wait()
    handler.release.set()

    workers.start()
    _wait_for(
        lambda: handler.messages,
        VISIBILITY_TIMEOUT + 60,
        f"the task was lost with the killed worker\n{workers.log()}",
    )
    assert [message["To"] for message in handler.messages] == [to]


def test_a_task_survives_its_pool_process_being_killed(
    workers: Workers, inbox: tuple[StallingInbox, int]
) -> None:
    handler = inbox[0]
    worker = workers.start()
    to = _send(workers)
    _wait_for(handler.stalled.is_set, 60, f"the worker never started the task\n{workers.log()}")
    (child,) = psutil.Process(worker.pid).children()
    child.send_signal(signal.SIGKILL)  # what the OOM killer does to the largest process
    handler.release.set()

    # The worker stays up, starts a new pool process and runs the task again there.
    _wait_for(
        lambda: handler.messages,
        VISIBILITY_TIMEOUT + 60,
        f"the task was lost with the killed pool process\n{workers.log()}",
    )
    assert [message["To"] for message in handler.messages] == [to]
    assert worker.poll() is None
