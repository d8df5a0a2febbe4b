"""The worklist's and QIDO-RS's common searches are answered from indexes on PostgreSQL.

bench/index_scale.py times them on 100,000 studies and 10 million instances; here a few thousand
studies are enough to see which plan PostgreSQL picks for the very statements the views run.
The searching facility holds a fifth of the studies, as the largest one does in the benchmark,
so reading them all is what a missing index costs: a sequential scan of the study table. Each search must read an
index instead, and the one migration 0018 made for it where PostgreSQL prefers it at this size
(without the migration those index names do not exist and the QIDO searches read the whole
study table).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from portal.models import Facility, User
from tests.helpers import client_for, require_postgresql
from transfers.models import Series, Study

pytestmark = pytest.mark.django_db

STUDIES = 2000  # of the searching facility; four times as many elsewhere
SURNAMES = ["Hamilton", "Nguyen", "Okafor", "Lindqvist", "Brown", "Garcia", "Kowalski", "Sato"]


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    require_postgresql("the plans are PostgreSQL's (CI runs the suite with DATABASE_URL)")


@pytest.fixture
def many(krmc: Facility, gfc: Facility) -> list[Study]:
    """Studies of Kalispell and (four times as many) Great Falls, as the regional centre holds a
    fifth of everything in the benchmark; two series each, 5 instances a series."""
    made = []
    for n in range(STUDIES * 5):
        facility = krmc if n < STUDIES else gfc
        surname = SURNAMES[n % len(SURNAMES)] + (f"{n % 97:02d}" if n % 3 else "")
        made.append(
            Study(
                facility=facility,
                study_instance_uid=f"1.2.826.0.1.3680043.10.{n}",
                patient_name=f"{surname.upper() if n % 2 else surname}^PAT{n}",
                patient_id=f"MRN{n:07d}",
                accession_number=f"A{n:08d}",
                study_date=dt.date(2020, 1, 1) + dt.timedelta(days=n % 2000),
                study_time=dt.time(n % 24, n % 60),
                modalities=(",CT,", ",MR,SR,", ",CR,", ",US,")[n % 4],
                num_series=2,
                num_instances=40,
                status="complete",
            )
        )
    studies = Study.objects.bulk_create(made)
    Series.objects.bulk_create(
        Series(
            study=study,
            series_instance_uid=f"{study.study_instance_uid}.{s}",
            modality=study.modalities.strip(",").split(",")[0],
            series_number=s,
            num_instances=5,
        )
        for study in studies
        for s in (1, 2)
    )
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO transfers_instance (facility_id, series_id, sop_instance_uid,
                sop_class_uid, transfer_syntax_uid, instance_number, size_bytes, sha256,
                original_sha256, storage_key, number_of_frames, created_at)
            SELECT st.facility_id, se.id, se.series_instance_uid || '.' || n, '1.2.3', '1.2.3', n,
                1000, md5(se.id || '.' || n), '', 'test/' || se.id || '/' || n, 1, now()
            FROM transfers_series se JOIN transfers_study st ON st.id = se.study_id,
                generate_series(1, 5) AS n
            """
        )
        cursor.execute("ANALYZE")
    return studies


def _plans(client: object, path: str, **headers: str) -> Iterator[str]:
    """The plan of every statement the request ran on the study, series or instance tables."""
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path, **headers)  # type: ignore[attr-defined]
    assert response.status_code == 200, (path, response.status_code)
    with connection.cursor() as cursor:
        for query in queries.captured_queries:
            sql = query["sql"]
            if sql.startswith("SELECT") and "transfers_study" in sql:
                cursor.execute("EXPLAIN " + sql)
                yield "\n".join(row[0] for row in cursor.fetchall())


def _assert_indexed(plans: list[str], index: str | None) -> None:
    text = "\n\n".join(plans)
    assert plans, "no statement read the study table"
    for table in ("transfers_study", "transfers_series", "transfers_instance"):
        assert f"Seq Scan on {table}" not in text, text
    assert index is None or index in text, text


QIDO = {"HTTP_ACCEPT": "application/dicom+json"}


@pytest.mark.parametrize(
    ("path", "index"),
    [
        # At this size reading the facility's 2,000 studies off its index is as cheap as the
        # trigram index; at 100,000 (bench/index_scale.py) PostgreSQL takes the trigram one.
        ("/studies/", None),
        ("/studies/?q=hamil", None),
        ("/studies/?q=Nguyen+pat12", None),
        ("/studies/?q=mrn0000123", None),
        # The accession index or the facility's own: at this size the planner's choice varies
        # with the run's statistics (bench/index_scale.py: the accession index, at 100,000).
        ("/studies/?q=a00000123", None),
        ("/studies/?from=2021-03-01&to=2021-03-31", "study_fac_date_order"),
        ("/studies/?modality=MR", None),
    ],
)
def test_it_answers_the_worklist_from_indexes(
    many: list[Study], alice: User, path: str, index: str | None
) -> None:
    _assert_indexed(list(_plans(client_for(alice), path)), index)


@pytest.mark.parametrize(
    ("path", "index"),
    [
        ("/dicom-web/studies?limit=101", "study_date_qido"),
        ("/dicom-web/studies?PatientName=ham*&limit=101", None),
        ("/dicom-web/studies?PatientID=MRN0000123", "study_patient_id"),
        ("/dicom-web/studies?StudyDate=20210301-20210331&limit=101", "study_date_qido"),
        ("/dicom-web/studies?ModalitiesInStudy=MR&limit=101", "study_date_qido"),
        ("/dicom-web/studies/1.2.826.0.1.3680043.10.123/series", "study_uid"),
        (
            "/dicom-web/studies/1.2.826.0.1.3680043.10.123/series/"
            "1.2.826.0.1.3680043.10.123.1/instances",
            "study_uid",
        ),
        ("/dicom-web/instances?PatientID=MRN0000123", "study_patient_id"),
        # By SOP Instance UID alone: the (facility, UID) index, not the whole instance table.
        (
            "/dicom-web/instances?SOPInstanceUID=1.2.826.0.1.3680043.10.123.1.3",
            "instance_unique_per_facility",
        ),
    ],
)
def test_it_answers_qido_from_indexes(
    many: list[Study], alice: User, path: str, index: str | None
) -> None:
    _assert_indexed(list(_plans(client_for(alice), path, **QIDO)), index)


def test_it_shows_the_same_worklist_page_as_a_full_sort(many: list[Study], alice: User) -> None:
    """The page read off the index is the page a sort of every study gives."""
    response = client_for(alice).get("/studies/?q=hamil")
    shown = [study.uuid for study in response.context["page"].object_list]
    expected = [
        study.uuid
        for study in sorted(
            (s for s in many if s.facility_id == alice.memberships.get().facility_id),
            key=lambda s: (s.study_date, s.study_time, s.pk),
            reverse=True,
        )
        if "HAMIL" in study.patient_name.upper()
    ][:25]
    assert shown == expected
