"""What storing costs the database: every SQL statement of an upload request counted (the token,
the facility, the duplicate check, the rows, the audit, the counters, the transaction), for one
file and for 50 files in one request, and what the cheaper paths still get right (duplicates,
conflicts, counters, the audit trail).

Counts are deterministic, so they are asserted exactly: a new statement on these paths should
be a decision, not an accident. On PostgreSQL an object joining a known series is written in one
statement (its row, its audit event and both counters); SQLite, the embedded default, cannot
modify data inside WITH and takes four.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum
from django.test import Client
from django.test.utils import CaptureQueriesContext
from pydicom.uid import generate_uid

from portal.models import AuditAction, AuditEvent, Facility, Outcome, User
from tests.helpers import dicom_bytes, upload
from transfers.models import Instance, Series, Study

pytestmark = pytest.mark.django_db(transaction=True)

# token, facility, duplicate check with the series, then the rows in one transaction:
# PostgreSQL BEGIN, one WITH statement, COMMIT; SQLite BEGIN, instance, audit event, series
# counters, study counters, COMMIT. (Before: 11 on both.)
ONE_FILE = {"postgresql": 6, "sqlite": 9}
# 50 files of a new study in one multipart request: token, facility, the study's known copies
# (once), then one transaction: BEGIN, study, series (lookup and insert each), the 50 instances,
# their 50 audit events, series counters, study lock, modalities, study counters, COMMIT.
# (Before: 3 + about 9 per file, 470 in all.)
FIFTY_FILES = {"postgresql": 16, "sqlite": 16}


def _file(study: str, series: str, number: int = 1, **changes: Any) -> bytes:
    return dicom_bytes(
        "CT_small.dcm",
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        InstanceNumber=number,
        **changes,
    )


def _form_post(client: Client, token: str, files: list[bytes]) -> Any:
    fields = []
    for number, data in enumerate(files):
        handle = io.BytesIO(data)
        handle.name = f"slice-{number:03}.dcm"
        fields.append(handle)
    return client.post(
        "/api/v1/instances?facility=krmc",
        {"file": fields},
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )


def _counted(call: Any) -> tuple[int, Any]:
    with CaptureQueriesContext(connection) as queries:
        answer = call()
    return len(queries.captured_queries), answer


def _counters_match_rows() -> None:
    for series in Series.objects.all():
        rows = Instance.objects.filter(series=series)
        assert series.num_instances == rows.count()
        assert series.size_bytes == (rows.aggregate(n=Sum("size_bytes"))["n"] or 0)
    for study in Study.objects.all():
        rows = Instance.objects.filter(series__study=study)
        assert study.num_instances == rows.count()
        assert study.size_bytes == (rows.aggregate(n=Sum("size_bytes"))["n"] or 0)
        assert study.num_series == study.series.count()


def test_one_file_into_a_known_series_costs_the_fewest_statements(
    client: Client, bob_token: str, bob: User, krmc: Facility
) -> None:
    study, series = generate_uid(), generate_uid()
    # The series' first file creates it (and stamps the token's last use).
    assert upload(client, _file(study, series, 1), token=bob_token).status_code == 201

    counts = []
    for number in (2, 3, 4):
        count, answer = _counted(
            lambda n=number: upload(client, _file(study, series, n), token=bob_token)
        )
        assert answer.status_code == 201, answer.content
        assert answer.json()["status"] == "stored"
        counts.append(count)

    assert counts == [ONE_FILE[connection.vendor]] * 3
    _counters_match_rows()
    assert Study.objects.get().num_instances == 4
    # The event written with the rows is the one audit_record writes.
    event = AuditEvent.objects.filter(action=AuditAction.UPLOAD).order_by("-pk").first()
    assert event is not None
    assert (event.actor, event.actor_email, event.facility, event.actor_facility) == (
        bob,
        bob.email,
        krmc,
        krmc,
    )
    assert (event.outcome, event.study_instance_uid, event.client_ip) == (
        Outcome.SUCCESS,
        study,
        "127.0.0.1",
    )
    assert event.detail["status"] == "stored" and event.detail["filename"] == "x.dcm"


def test_fifty_files_in_one_request_are_written_together(
    client: Client, bob_token: str, krmc: Facility
) -> None:
    study, series = generate_uid(), generate_uid()
    files = [_file(study, series, n) for n in range(1, 51)]

    count, answer = _counted(lambda: _form_post(client, bob_token, files))

    assert answer.status_code == 200, answer.content
    assert answer.json()["counts"] == {"stored": 50}
    assert count == FIFTY_FILES[connection.vendor]
    assert count / 50 < 0.4
    _counters_match_rows()
    assert AuditEvent.objects.filter(action=AuditAction.UPLOAD).count() == 50
    names = sorted(
        AuditEvent.objects.filter(action=AuditAction.UPLOAD).values_list(
            "detail__filename", flat=True
        )
    )
    assert names == [f"slice-{n:03}.dcm" for n in range(50)]


def test_a_request_resending_a_study_stores_nothing_twice(
    client: Client, bob_token: str, krmc: Facility
) -> None:
    """Duplicates, a changed copy, the same file twice in one request, and a UID already used
    in another study: each answered as one file at a time would be; nothing stored twice."""
    study, series, other = generate_uid(), generate_uid(), generate_uid()
    first = [_file(study, series, n) for n in range(1, 4)]
    elsewhere = _file(other, generate_uid(), 1)
    assert _form_post(client, bob_token, [*first, elsewhere]).json()["counts"] == {"stored": 4}
    stored = set(Instance.objects.values_list("storage_key", flat=True))

    from pydicom import dcmread

    changed = dcmread(io.BytesIO(first[1]))
    changed.PatientName = "CHANGED^COPY"
    changed_bytes = io.BytesIO()
    changed.save_as(changed_bytes, enforce_file_format=True)
    reused = dcmread(io.BytesIO(elsewhere))
    reused.StudyInstanceUID, reused.SeriesInstanceUID = study, series
    reused.PatientName = "OTHER^STUDY"
    reused_bytes = io.BytesIO()
    reused.save_as(reused_bytes, enforce_file_format=True)
    new = _file(study, series, 9)

    answer = _form_post(
        client,
        bob_token,
        [first[0], changed_bytes.getvalue(), new, new, reused_bytes.getvalue(), first[2]],
    )

    statuses = [result["status"] for result in answer.json()["results"]]
    assert statuses == ["duplicate", "conflict", "stored", "duplicate", "conflict", "duplicate"]
    assert answer.status_code == 207  # some stored, some not
    keys = set(Instance.objects.values_list("storage_key", flat=True))
    assert len(keys - stored) == 1  # only the new file
    _counters_match_rows()
    # Every file of the request has its event, with what happened to it.
    events = AuditEvent.objects.filter(action=AuditAction.UPLOAD).order_by("-pk")[:6]
    assert sorted(e.detail["status"] for e in events) == sorted(statuses)
