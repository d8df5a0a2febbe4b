"""/metrics for Prometheus: who may scrape it, and that what Relay does shows in it (uploads by
entry point, gateway associations, pushes, e-mail, task failures and retries, storage_verify,
queue depths); and that the counts of two gunicorn workers add up."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from celery.exceptions import Retry
from django.core import mail
from django.core.files.storage import storages
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from portal.metrics import REFUSALS_ALLOWED
from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import (
    client_for,
    dicom_bytes,
    gateway_allow,
    gateway_running,
    peer_missing,
    upload,
)
from tests.server_process import database_url_of_this_run, free_port, relay_server
from transfers.models import Instance, Study

TOKEN = "metrics-token-0123456789abcdef0123456789"


@pytest.fixture
def token(settings: Any) -> str:
    settings.RELAY_METRICS_TOKEN = TOKEN
    return TOKEN


def scrape(client: Client | None = None, **extra: Any) -> dict[tuple[str, frozenset[Any]], float]:
    """Every sample of one authorised scrape: (name, labels) -> value."""
    response = (client or Client()).get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", **extra)
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"].startswith("text/plain")
    return samples(response.content.decode())


def samples(text: str) -> dict[tuple[str, frozenset[Any]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


# --- who may scrape -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_is_off_until_a_token_or_an_address_list_is_set(settings: Any) -> None:
    settings.RELAY_METRICS_TOKEN = ""
    settings.RELAY_METRICS_ALLOW = []
    assert Client().get("/metrics").status_code == 404
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer anything").status_code == 404


@pytest.mark.django_db
def test_it_refuses_a_scrape_without_the_right_token_and_audits_it(token: str) -> None:
    assert Client().get("/metrics").status_code == 403
    wrong = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer not-the-token")
    assert wrong.status_code == 403
    assert b"relay_" not in wrong.content
    events = AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED)
    assert events.count() == 2
    event = events.first()
    assert event is not None
    assert event.detail == {"reason": "no or wrong bearer token", "page": "metrics"}
    assert event.client_ip == "127.0.0.1"
    assert TOKEN not in str(event.detail)


@pytest.mark.django_db
def test_an_address_refused_too_often_is_refused_for_a_while_and_not_audited_each_time(
    token: str,
) -> None:
    for _ in range(REFUSALS_ALLOWED + 5):
        Client().get("/metrics", HTTP_AUTHORIZATION="Bearer guess")
    # Even the right token waits now; the trail holds the first refusals, not a flood.
    assert Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 429
    assert AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED).count() == REFUSALS_ALLOWED


@pytest.mark.django_db
def test_it_answers_a_scrape_by_the_nodes_own_address_over_plain_http(
    token: str, settings: Any
) -> None:
    """Prometheus asks each node by its address: no ALLOWED_HOSTS refusal, no HTTPS redirect."""
    settings.ALLOWED_HOSTS = ["relay.example.org"]
    settings.SECURE_SSL_REDIRECT = True
    scraped = scrape(HTTP_HOST="10.0.0.11:8000")
    assert value(scraped, "relay_broker_up") in (0.0, 1.0)
    assert Client().get("/", HTTP_HOST="10.0.0.11:8000").status_code == 400  # pages still refuse


@pytest.mark.django_db
def test_the_address_list_sees_the_client_behind_the_proxy(settings: Any) -> None:
    settings.RELAY_METRICS_TOKEN = ""
    settings.RELAY_METRICS_ALLOW = ["10.0.0.0/24"]
    settings.RELAY_TRUSTED_PROXIES = ["192.0.2.1"]
    assert Client(REMOTE_ADDR="10.0.0.7").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="198.51.100.23").get("/metrics").status_code == 403
    # Through the load balancer, the address that counts is the client's, not the balancer's.
    proxied = Client(REMOTE_ADDR="192.0.2.1", HTTP_X_FORWARDED_FOR="198.51.100.23")
    assert proxied.get("/metrics").status_code == 403
    inside = Client(REMOTE_ADDR="192.0.2.1", HTTP_X_FORWARDED_FOR="10.0.0.9")
    assert inside.get("/metrics").status_code == 200


# --- what it counts -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_requests_are_counted_by_view_method_and_status(token: str, bob: User) -> None:
    before = scrape()
    client = client_for(bob)
    assert client.get("/studies/").status_code == 200
    assert Client().get("/no-such-page/").status_code == 404
    after = scrape()
    for view, status in (("studies", "200"), ("unresolved", "404")):
        labels = {"view": view, "method": "GET", "status": status}
        assert value(after, "relay_http_requests_total", **labels) == (
            value(before, "relay_http_requests_total", **labels) + 1
        )
    count = ("relay_http_request_duration_seconds_count", {"view": "studies", "method": "GET"})
    assert value(after, count[0], **count[1]) == value(before, count[0], **count[1]) + 1
    # No identifiers in labels: the study list's URL name, never a path.
    names = {dict(labels).get("view", "") for _, labels in after}
    assert not any("/" in name for name in names)


@pytest.mark.django_db
def test_an_upload_counts_its_instance_and_bytes_by_entry_point(
    token: str, bob: User, bob_token: str
) -> None:
    data = dicom_bytes(PatientName="DOE^JANE", PatientID="MRN-4711")
    uploader = dicom_bytes()
    before = scrape()
    assert upload(Client(), data, token=bob_token).status_code == 201
    assert upload(Client(), data, token=bob_token).status_code == 200  # the same bytes again
    sent = Client(HTTP_USER_AGENT="relay-uploader/0.1.0")
    assert upload(sent, uploader, token=bob_token).status_code == 201
    browser = dicom_bytes()
    assert upload(client_for(bob), browser).status_code == 201
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    after = samples(response.content.decode())

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("relay_ingest_instances_total", entry="api", outcome="stored") == 1
    assert grew("relay_ingest_bytes_total", entry="api", outcome="stored") == len(data)
    assert grew("relay_ingest_instances_total", entry="api", outcome="duplicate") == 1
    assert grew("relay_ingest_instances_total", entry="relay_send", outcome="stored") == 1
    assert grew("relay_ingest_bytes_total", entry="relay_send", outcome="stored") == len(uploader)
    assert grew("relay_ingest_instances_total", entry="browser", outcome="stored") == 1
    # Nothing of the patient, the facility or the study in what Prometheus reads.
    text = response.content.decode()
    study = Study.objects.first()
    assert study is not None
    for secret in ("DOE", "JANE", "MRN-4711", "krmc", "Kalispell", str(study.uuid)):
        assert secret not in text
    assert study.study_instance_uid not in text


@pytest.mark.django_db
def test_a_stow_rs_upload_counts_as_stow_rs(token: str, bob: User, bob_token: str) -> None:
    data = dicom_bytes()
    boundary = "metrics-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\nnot dicom\r\n--{boundary}--\r\n".encode()
    )
    before = scrape()
    response = Client().post(
        "/dicom-web/studies?facility=krmc",
        data=body,
        content_type=f'multipart/related; type="application/dicom"; boundary="{boundary}"',
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code in (200, 202), response.content[:500]
    after = scrape()
    stored = {"entry": "stow_rs", "outcome": "stored"}
    rejected = {"entry": "stow_rs", "outcome": "rejected"}
    assert value(after, "relay_ingest_instances_total", **stored) == (
        value(before, "relay_ingest_instances_total", **stored) + 1
    )
    assert value(after, "relay_ingest_bytes_total", **stored) == (
        value(before, "relay_ingest_bytes_total", **stored) + len(data)
    )
    assert value(after, "relay_ingest_instances_total", **rejected) == (
        value(before, "relay_ingest_instances_total", **rejected) + 1
    )


@pytest.mark.django_db(transaction=True)
def test_the_gateway_counts_associations_and_c_store(token: str, krmc: Facility) -> None:
    from pynetdicom import AE

    gateway_allow(krmc, "PACS1")
    data = dicom_bytes()
    before = scrape()
    with gateway_running() as port:
        ae = AE(ae_title="PACS1")
        ae.add_requested_context(pydicom.dcmread(io.BytesIO(data)).SOPClassUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="KRMC")
        assert assoc.is_established
        during = scrape()
        status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(data)))
        assert status.Status == 0x0000
        assoc.release()
        refused = AE(ae_title="STRANGER")
        refused.add_requested_context("1.2.840.10008.1.1")
        assert not refused.associate("127.0.0.1", port, ae_title="KRMC").is_established
        nobody = refused.associate("127.0.0.1", port, ae_title="NOBODY")
        assert not nobody.is_established
    after = scrape()
    assert value(during, "relay_gateway_associations_active") == (
        value(before, "relay_gateway_associations_active") + 1
    )
    assert value(after, "relay_gateway_associations_active") == value(
        before, "relay_gateway_associations_active"
    )
    accepted = "relay_gateway_associations_accepted_total"
    assert value(after, accepted) == value(before, accepted) + 1
    rejected = "relay_gateway_associations_rejected_total"
    for reason in ("calling_ae", "called_ae"):
        assert value(after, rejected, reason=reason) == value(before, rejected, reason=reason) + 1
    stored = {"entry": "c_store", "outcome": "stored"}
    assert value(after, "relay_ingest_instances_total", **stored) == (
        value(before, "relay_ingest_instances_total", **stored) + 1
    )
    assert (
        value(after, "relay_ingest_bytes_total", **stored)
        >= value(before, "relay_ingest_bytes_total", **stored) + len(data) - 200
    )  # the gateway writes the file meta itself, naming the sender
    # No AE title, address or facility in a label.
    labels = {v for _, labelset in after for _, v in labelset}
    assert not labels & {"PACS1", "STRANGER", "KRMC", "NOBODY", "127.0.0.1", "krmc"}


class _RefusingBackend:
    """An SMTP server that is down."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def send_messages(self, messages: Any) -> int:
        raise ConnectionRefusedError("SMTP server down")


@pytest.mark.django_db
def test_a_failing_mail_server_counts_email_failures_task_retries_and_the_task_failure(
    token: str, settings: Any
) -> None:
    from portal.tasks import email_send

    settings.EMAIL_BACKEND = f"{__name__}._RefusingBackend"
    before = scrape()
    # As a worker runs it (exceptions become the task's state, not the caller's): each
    # attempt fails, the OSError is retried with backoff, until the retries run out.
    from relay.celery import app

    app.conf.task_eager_propagates = False  # the autouse fixture sets it again for each test
    result = email_send.apply(
        kwargs={"to": "x@example.org", "subject": "s", "text": "t", "html": "<p>h</p>"},
        throw=False,
    )
    assert result.state == "FAILURE"
    after = scrape()
    task = {"task": "portal.tasks.email_send"}
    failures = {"error": "ConnectionRefusedError"}
    grown = value(after, "relay_email_failures_total", **failures) - value(
        before, "relay_email_failures_total", **failures
    )
    retried = value(after, "relay_task_retries_total", **task) - value(
        before, "relay_task_retries_total", **task
    )
    assert retried == email_send.max_retries
    assert grown == retried + 1  # every attempt failed: each but the last was retried
    assert value(after, "relay_task_failures_total", **task) == (
        value(before, "relay_task_failures_total", **task) + 1
    )
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    email_send.apply(kwargs={"to": "x@example.org", "subject": "s", "text": "t", "html": "h"})
    assert len(mail.outbox) == 1
    assert value(scrape(), "relay_email_sent_total") == value(after, "relay_email_sent_total") + 1


@pytest.mark.django_db
def test_an_unreachable_pacs_counts_a_failed_attempt_then_a_failed_push(
    token: str,
    bob: User,
    bob_token: str,
    dana: User,
    gfc: Facility,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from transfers.access import study_access
    from transfers.dicom.push import push_create
    from transfers.dicom.tasks import push_run
    from transfers.models import PacsDestination, Push, StudyStatus
    from transfers.sharing.services import share_create

    assert upload(Client(), dicom_bytes(), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    share_create(
        facility=bob.memberships.get().facility,
        created_by=bob,
        studies=list(Study.objects.all()),
        kind="facility",
        recipient_facility=gfc,
        can_import=True,
    )
    destination = PacsDestination.objects.create(
        facility=gfc, name="GFC PACS", ae_title="GFCPACS", host="127.0.0.1", port=free_port()
    )

    class Signed:
        user = dana

    before = scrape()
    access = study_access(Signed(), Study.objects.get().uuid)  # type: ignore[arg-type]
    with pytest.raises(Retry), django_capture_on_commit_callbacks(execute=True):
        push_create(access=access, destination=destination, by=dana)
    middle = scrape()
    assert value(middle, "relay_push_attempt_failures_total") == (
        value(before, "relay_push_attempt_failures_total") + 1
    )
    push_run.apply(args=[Push.objects.get().pk], retries=push_run.max_retries)
    after = scrape()
    assert value(after, "relay_push_finished_total", outcome="failed") == (
        value(before, "relay_push_finished_total", outcome="failed") + 1
    )


@pytest.mark.django_db
def test_storage_verify_findings_show_as_counters_and_as_the_last_runs_figures(
    token: str, bob_token: str
) -> None:
    from transfers.integrity import storage_verify

    for _ in range(2):
        assert upload(Client(), dicom_bytes(), token=bob_token).status_code == 201
    damaged = Instance.objects.order_by("pk").first()
    assert damaged is not None
    path = Path(storages["default"].path(damaged.storage_key))
    path.write_bytes(path.read_bytes()[:-10] + b"X" * 10)
    before = scrape()
    run = storage_verify(tell_staff=False)
    assert run.finished_at is not None and run.corrupt == 1
    after = scrape()
    assert value(after, "relay_storage_verify_findings_total", kind="corrupt") == (
        value(before, "relay_storage_verify_findings_total", kind="corrupt") + 1
    )
    assert value(after, "relay_storage_verify_checked_total") == (
        value(before, "relay_storage_verify_checked_total") + 2
    )
    assert value(after, "relay_integrity_failures_total", where="storage_verify") == (
        value(before, "relay_integrity_failures_total", where="storage_verify") + 1
    )
    # From the database: a worker's restart does not hide what the last run found.
    assert value(after, "relay_storage_verify_last_run_findings", kind="corrupt") == 1
    assert value(after, "relay_storage_verify_last_run_findings", kind="missing") == 0
    finished = value(after, "relay_storage_verify_last_run_finished_timestamp_seconds")
    assert abs(finished - run.finished_at.timestamp()) < 1
    assert value(after, "relay_database_up") == 1


# --- queue depths, read from the broker at scrape time -------------------------------------------


def _publish(url: str, transport: str | None, counts: dict[str, int]) -> None:
    from kombu import Connection

    from relay.celery import app

    queues = {queue.name: queue for queue in app.conf.task_queues}
    with Connection(url, transport=transport) as connection:
        producer = connection.Producer()
        for name, count in counts.items():
            for n in range(count):
                producer.publish(
                    {"n": n},
                    exchange=queues[name].exchange,
                    routing_key=name,
                    declare=[queues[name]],
                    serializer="json",
                )


@pytest.fixture
def broker(request: Any, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """The broker a scrape reads from, with empty queues: the embedded SQLite file, Redis (a
    database of its own) or RabbitMQ (a virtual host of its own)."""
    from relay.celery import app

    kind = request.param
    if kind == "sqlite":
        url, transport = f"sqlite:///{tmp_path / 'broker.sqlite3'}", "relay.broker:Transport"
    elif kind == "redis":
        import redis

        url, transport = "redis://127.0.0.1:6379/13", "redis"
        try:
            redis.Redis.from_url(url).flushdb()
        except redis.exceptions.ConnectionError:
            peer_missing("Redis is not running on 127.0.0.1:6379")
    else:
        vhost = f"metrics-{os.getpid()}"
        try:
            subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
            subprocess.run(
                ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                check=True,
                capture_output=True,
            )
        except (OSError, subprocess.CalledProcessError):
            peer_missing("RabbitMQ (rabbitmqctl) is not running here")
        url, transport = f"amqp://guest:guest@127.0.0.1:5672/{vhost}", "pyamqp"
    saved = (app.conf.broker_read_url, app.conf.broker_transport)
    app.conf.broker_read_url, app.conf.broker_transport = url, transport
    try:
        yield url, transport
    finally:
        app.conf.broker_read_url, app.conf.broker_transport = saved
        if kind == "rabbitmq":
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], check=False, capture_output=True)
        elif kind == "redis":
            import redis

            redis.Redis.from_url(url).flushdb()


@pytest.mark.django_db
@pytest.mark.parametrize("broker", ["sqlite", "redis", "rabbitmq"], indirect=True)
def test_queue_depths_are_read_from_the_broker(token: str, broker: tuple[str, str | None]) -> None:
    url, transport = broker
    _publish(url, transport, {"slow": 3, "render": 1})
    scraped = scrape()
    assert value(scraped, "relay_broker_up") == 1
    assert value(scraped, "relay_queue_depth", queue="slow") == 3
    assert value(scraped, "relay_queue_depth", queue="render") == 1
    assert value(scraped, "relay_queue_depth", queue="quick") == 0


@pytest.mark.django_db
def test_an_unreachable_broker_says_so(token: str) -> None:
    from relay.celery import app

    saved = (app.conf.broker_read_url, app.conf.broker_transport)
    app.conf.broker_read_url, app.conf.broker_transport = "redis://127.0.0.1:1/0", "redis"
    try:
        scraped = scrape()
    finally:
        app.conf.broker_read_url, app.conf.broker_transport = saved
    assert value(scraped, "relay_broker_up") == 0
    assert not any(name == "relay_queue_depth" for name, _ in scraped)


# --- across processes ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_two_gunicorn_workers_add_up(tmp_path: Path) -> None:
    """Requests answered by either of two pre-forked workers all show in one scrape, from
    whichever worker answers it; a worker that ends keeps its counts."""
    metrics_dir = tmp_path / "metrics"
    env = {"RELAY_METRICS_TOKEN": TOKEN, "RELAY_METRICS_DIR": str(metrics_dir)}
    headers = {"Authorization": f"Bearer {TOKEN}", "Connection": "close"}
    sent = 0
    with relay_server(
        tmp_path, database_url=database_url_of_this_run(), env=env, workers=2
    ) as server:

        def ask(n: int) -> None:
            for _ in range(n):
                assert server.request("GET", "/accounts/login/", headers=headers).status == 200

        # Until both workers have answered some (each writes a file of its own): parallel
        # clients, so that the idle worker takes what the busy one cannot.
        for _ in range(20):
            threads = [threading.Thread(target=ask, args=(5,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sent += 20
            pids = {
                re.sub(r"^counter_web-(\d+)\.db$", r"\1", path.name)
                for path in metrics_dir.glob("counter_web-*.db")
            }
            if len(pids) >= 2:
                break
        assert len(pids) >= 2, "one worker answered everything"
        labels = {"view": "login", "method": "GET", "status": "200"}
        for _ in range(4):  # each scrape is answered by one worker or the other: all see all
            answer = server.request("GET", "/metrics", headers=headers)
            assert answer.status == 200
            assert (
                value(samples(answer.body.decode()), "relay_http_requests_total", **labels) == sent
            )
        # A worker killed (and replaced by the master) keeps what it counted.
        os.kill(int(next(iter(pids))), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(list(metrics_dir.glob("counter_web-*.db"))) < 3:
            assert time.monotonic() < deadline, "the new worker answered nothing"
            threads = [threading.Thread(target=ask, args=(2,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sent += 8
        answer = server.request("GET", "/metrics", headers=headers)
        assert value(samples(answer.body.decode()), "relay_http_requests_total", **labels) == sent


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_gateway_of_two_processes_adds_up_on_its_own_port(krmc: Facility, tmp_path: Path) -> None:
    """A node without a web server: `dicom_gateway --processes 2` serves the node's metrics on
    RELAY_METRICS_PORT; associations held by either process show in one scrape."""
    import urllib.error
    import urllib.request

    from pynetdicom import AE

    from bench.servers import stop_process_tree

    gateway_allow(krmc, "PACS1")
    port, metrics_port = free_port(), free_port()
    metrics_dir = tmp_path / "metrics"
    env = {
        **os.environ,
        "DATABASE_URL": database_url_of_this_run(),
        "RELAY_VAR_DIR": str(tmp_path / "var"),
        "RELAY_METRICS_PORT": str(metrics_port),
        "RELAY_METRICS_TOKEN": TOKEN,
        "RELAY_METRICS_DIR": str(metrics_dir),
    }
    env.pop("REDIS_URL", None)

    def requestor() -> Any:
        ae = AE(ae_title="PACS1")
        ae.add_requested_context("1.2.840.10008.1.1")
        return ae

    def exported(token: str = TOKEN) -> dict[tuple[str, frozenset[Any]], float]:
        request = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics")
        request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            return samples(answer.read().decode())

    log = tmp_path / "gateway.log"
    with log.open("w") as out:
        gateway = subprocess.Popen(
            [
                sys.executable, "manage.py", "dicom_gateway", "--host", "127.0.0.1",
                "--port", str(port), "--tls-port", "0", "--processes", "2",
            ],
            cwd=Path(__file__).resolve().parent.parent.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        accepted = 0
        deadline = time.monotonic() + 60
        while True:
            probe = requestor().associate("127.0.0.1", port, ae_title="KRMC")
            if probe.is_established:
                accepted += 1
                probe.release()
                break
            assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        held = [requestor().associate("127.0.0.1", port, ae_title="KRMC") for _ in range(4)]
        assert all(assoc.is_established for assoc in held)
        accepted += 4
        scraped = exported()
        assert value(scraped, "relay_gateway_associations_active") == 4, log.read_text()
        assert value(scraped, "relay_gateway_associations_accepted_total") == accepted
        # Both serving processes hold some (the least busy one accepts), each in files of its
        # own beside the parent's.
        pids = {int(path.stem.rsplit("-", 1)[1]) for path in metrics_dir.glob("*_gateway.*")}
        assert len(pids - {gateway.pid}) == 2, sorted(metrics_dir.iterdir())
        for assoc in held:
            assoc.release()
        deadline = time.monotonic() + 30
        while value(exported(), "relay_gateway_associations_active") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as refused:
            exported(token="wrong")
        assert refused.value.code == 403
        assert AuditEvent.objects.filter(
            action=AuditAction.ACCESS_DENIED, detail__page="metrics"
        ).exists()
    finally:
        stop_process_tree(gateway)  # type: ignore[arg-type]
