"""Health endpoints for load balancers and monitors (issue 18, item 3; relay/health.py)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_live_process_answers_without_reading_anything(client: Client) -> None:
    answer = client.get("/health/live/")
    assert answer.status_code == 200 and answer.content == b"ok\n"
    assert "no-cache" in answer["Cache-Control"] or "max-age=0" in answer["Cache-Control"]


def test_ready_names_each_check_and_is_200_when_all_work(client: Client) -> None:
    answer = client.get("/health/ready/", HTTP_ACCEPT="text/html")
    assert answer.status_code == 200, answer.content
    checks = answer.json()
    assert set(checks.values()) == {"OK"}
    names = " ".join(checks)
    for name in ("Database", "Storage", "Cache", "Broker"):
        assert name in names, checks


def test_ready_is_503_naming_the_broker_when_it_is_down(client: Client, tmp_path: Any) -> None:
    from relay.celery import app

    before = app.conf.broker_url
    if app.conf.broker_transport:  # the embedded broker: a file that cannot be opened
        (tmp_path / "a-file").write_text("not a folder")
        down = f"sqlite:///{tmp_path / 'a-file' / 'broker.sqlite3'}"
    else:  # Redis or RabbitMQ: nothing listens on port 9
        down = before.split("://")[0] + "://127.0.0.1:9/"
    app.conf.update(broker_url=down)
    try:
        answer = client.get("/health/ready/")
    finally:
        app.conf.update(broker_url=before)
    assert answer.status_code == 503
    failing = {name: state for name, state in answer.json().items() if state != "OK"}
    assert list(failing) == [next(n for n in failing if "Broker" in n)], failing
    assert "127.0.0.1" not in answer.content.decode() and "a-file" not in answer.content.decode()


def test_ready_is_503_when_the_image_store_cannot_be_written(
    client: Client, settings: Any, tmp_path: Any
) -> None:
    # A folder that cannot be made (its parent is a file): every save fails, even as root.
    full = tmp_path / "a-file"
    full.write_text("not a folder")
    full = full / "images"
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "relay.storage.AtomicFileSystemStorage",
            "OPTIONS": {"location": str(full)},
        },
    }
    answer = client.get("/health/ready/")
    assert answer.status_code == 503
    assert [n for n, state in answer.json().items() if state != "OK" and "Storage" in n]


def test_a_balancer_asking_a_node_by_its_address_over_http_gets_an_answer(
    client: Client, settings: Any
) -> None:
    """Production refuses any Host but the site's (400) and redirects plain HTTP to HTTPS (301);
    a load balancer asks each node by its own address over plain HTTP, and gets the health
    answer. Everything else stays refused."""
    settings.ALLOWED_HOSTS = ["relay.example.org"]
    settings.SECURE_SSL_REDIRECT = True
    node = {"HTTP_HOST": "10.0.0.11:8000"}
    assert client.get("/health/live/", **node).status_code == 200
    ready = client.get("/health/ready/", **node)
    assert ready.status_code == 200 and ready.json()
    assert client.get("/accounts/login/", **node).status_code == 400
    assert client.get("/accounts/login/", HTTP_HOST="relay.example.org").status_code == 301


def test_ready_checks_the_gateways_it_is_told_about(client: Client, settings: Any) -> None:
    """With RELAY_HEALTH_GATEWAYS set, readiness asks each gateway for a connection: 200 while
    the gateway listens, 503 naming the gateway (not its address) once it is gone."""
    from tests.helpers import gateway_running

    with gateway_running() as port:
        settings.RELAY_HEALTH_GATEWAYS = [f"127.0.0.1:{port}"]
        up = client.get("/health/ready/")
        assert up.status_code == 200, up.json()
        assert any("Gateway" in name for name in up.json())
    down = client.get("/health/ready/")
    assert down.status_code == 503
    failing = {name: state for name, state in down.json().items() if state != "OK"}
    assert [name for name in failing if "Gateway" in name] == list(failing), failing
    assert "gateway 1" in str(failing) and str(port) not in down.content.decode()
