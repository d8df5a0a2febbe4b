"""deploy/prometheus/relay-alerts.yml: valid Prometheus rules, each on a metric Relay exports
(or one of the few the operator's blackbox and node exporters add), none misspelt."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from transfers.models.studies import StorageVerifyRun

RULES = Path(__file__).resolve().parent.parent.parent / "deploy" / "prometheus" / "relay-alerts.yml"
# Not Relay's: Prometheus's own scrape health, the blackbox exporter probing /health/ready/ and
# node_exporter's free disk (README: Alerts says how to run them).
EXTERNAL = {"up", "probe_success", "node_filesystem_avail_bytes", "node_filesystem_size_bytes"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "bool", "offset"}
SEVERITIES = {"page", "ticket"}


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _metrics_named(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords,
    label names or values, durations or numbers."""
    text = re.sub(r'"[^"]*"', "", expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
    return {name for name in names if name not in KEYWORDS}


@pytest.fixture
def exported(settings: Any, db: None) -> set[str]:
    """Every metric name a scrape of this process shows (a finished scrub on record, so that
    its figures are there too)."""
    settings.RELAY_METRICS_TOKEN = "alerts-test-token-0123456789"
    StorageVerifyRun.objects.create(
        finished_at=timezone.now(), instances_done=True, extras_done=True
    )
    response = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer alerts-test-token-0123456789")
    assert response.status_code == 200
    names: set[str] = set()
    for family in text_string_to_metric_families(response.content.decode()):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_rule_is_an_alert_with_a_severity_and_a_summary() -> None:
    rules = _rules()
    assert len(rules) >= 15
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]


def test_every_expression_reads_metrics_relay_exports(exported: set[str]) -> None:
    assert "relay_ingest_instances_total" in exported  # the scrape is the real one
    for rule in _rules():
        named = _metrics_named(rule["expr"])
        assert named, f"{rule['alert']} reads no metric"
        unknown = named - exported - EXTERNAL
        assert not unknown, f"{rule['alert']} reads {unknown}, which Relay does not export"


def test_the_alerts_cover_what_an_operator_must_hear_of() -> None:
    read = set().union(*(_metrics_named(rule["expr"]) for rule in _rules()))
    for metric in (
        "probe_success",  # readiness
        "relay_queue_depth",
        "relay_task_failures_total",
        "relay_push_finished_total",
        "relay_email_failures_total",
        "relay_storage_verify_last_run_findings",
        "relay_http_requests_total",  # 5xx rate
        "relay_http_request_duration_seconds_bucket",  # p95
        "relay_storage_errors_total",
        "node_filesystem_avail_bytes",
    ):
        assert metric in read, metric


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
