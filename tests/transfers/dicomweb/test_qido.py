"""QIDO-RS answers read from the index: the attributes each level must return, the media type,
the matching rules peers rely on (OHIF's tag keys and doubled wildcards), refusals of values
that cannot be read (400 with the reason), and a bounded number of SQL statements."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from .conftest import UploadedStudy, bearer, study_upload

pytestmark = pytest.mark.django_db

ONE = (("CT_small.dcm", 1),)


def _get(client: Client, token: str, path: str, **params: Any) -> Any:
    return client.get(f"/dicom-web/{path}", params, **bearer(token))


def test_a_study_answer_has_every_required_attribute(
    client: Client, read_token: str, ct_study: UploadedStudy
) -> None:
    answer = _get(client, read_token, "studies")
    assert answer.status_code == 200
    assert answer["Content-Type"] == "application/dicom+json"
    (study,) = answer.json()
    for tag in (
        "00080020 00080030 00080050 00080061 00080090 00081190 00100010 00100020 00100030 "
        "00100040 0020000D 00200010 00201206 00201208"
    ).split():
        assert tag in study, tag
    # Present though empty: {"vr": ...} with no Value.
    assert study["00080090"] == {"vr": "PN"}
    assert study["00080061"]["Value"] == ["CT", "MR", "OT"]


def test_series_and_instances_carry_their_parents_uids(
    client: Client, read_token: str, ct_study: UploadedStudy
) -> None:
    series = _get(client, read_token, "series").json()
    assert len(series) == 4
    assert {s["0020000D"]["Value"][0] for s in series} == {ct_study.uid}
    for tag in ("00080060", "0020000E", "00200011", "00201209", "00081190"):
        assert all(tag in s for s in series), tag
    instances = _get(
        client, read_token, "instances", SOPInstanceUID=ct_study.sop_of("CT_small.dcm")
    )
    (instance,) = instances.json()
    for tag in ("00080016", "00080018", "00200013", "00280010", "00280011", "0020000E"):
        assert tag in instance, tag
    url = instance["00081190"]["Value"][0]
    assert url.endswith(
        f"/studies/{ct_study.uid}/series/{ct_study.series_of('CT_small.dcm')}"
        f"/instances/{ct_study.sop_of('CT_small.dcm')}"
    )


def test_it_matches_as_ohif_asks(client: Client, bob_token: str, read_token: str) -> None:
    doe = study_upload(client, bob_token, patient_name="DOE^JANE", sources=ONE)
    study_upload(client, bob_token, patient_name="ROE^RICHARD", patient_id="X-9", sources=ONE)

    def uids(**params: Any) -> set[str]:
        answer = _get(client, read_token, "studies", **params)
        assert answer.status_code == 200, answer.content
        return {a["0020000D"]["Value"][0] for a in answer.json()}

    assert uids(PatientName="*do**", limit="101", offset="0", fuzzymatching="false") == {doe.uid}
    assert uids(**{"00100020": "PID-1"}) == {doe.uid}
    assert uids(**{"00100020": "PID*"}) == {doe.uid}
    assert uids(PatientID="pid-1") == set()  # IDs match exactly, case and all
    assert len(uids(PatientName="*")) == 2
    assert uids(StudyDate="20240315") == uids(StudyDate="-20240315") == uids()
    assert uids(StudyDate="20240316-") == set()
    assert uids(StudyTime="0700-0800") == uids()
    assert uids(ModalitiesInStudy="MR") == set()
    # includefield as a list, as repeated keys, and "all".
    answer = _get(client, read_token, "studies", includefield="00081030,IssuerOfPatientID")
    assert {"00081030", "00100021"} <= set(answer.json()[0])
    series = _get(client, read_token, f"studies/{doe.uid}/series", includefield="all").json()
    assert "00180015" in series[0] and "00100010" in series[0]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"StudyDate": "2024-03-15"}, "StudyDate is a date"),
        ({"StudyDate": "20241399"}, "StudyDate is a date"),
        ({"StudyTime": "25"}, "StudyTime is a time"),
        ({"StudyInstanceUID": "1.2.x"}, "not a UID"),
        ({"limit": "-1"}, "limit is a whole number"),
        ({"offset": "many"}, "offset is a whole number"),
        ({"SeriesNumber": "x"}, "SeriesNumber is a number"),
        ({"fuzzymatching": "maybe"}, "fuzzymatching"),
    ],
)
def test_unreadable_values_are_refused_with_the_reason(
    client: Client, read_token: str, params: dict[str, str], reason: str
) -> None:
    path = "series" if "SeriesNumber" in params else "studies"
    answer = _get(client, read_token, path, **params)
    assert answer.status_code == 400
    assert reason in answer.content.decode()


def test_a_bad_uid_in_the_path_is_refused(client: Client, read_token: str) -> None:
    answer = _get(client, read_token, "studies/1.2.abc/series")
    assert answer.status_code == 400 and "Not a DICOM UID" in answer.content.decode()


def test_unknown_keys_are_named_in_a_warning(client: Client, read_token: str) -> None:
    answer = _get(client, read_token, "studies", Manufacturer="X", **{"00191010": "Y"})
    assert answer.status_code == 200 and answer.json() == []
    assert "not supported for matching: 00191010, Manufacturer" in answer["Warning"]


def test_xml_is_not_acceptable(client: Client, read_token: str) -> None:
    answer = client.get(
        "/dicom-web/studies", HTTP_ACCEPT="application/dicom+xml", **bearer(read_token)
    )
    assert answer.status_code == 406
    assert (
        client.get("/dicom-web/studies", HTTP_ACCEPT="*/*", **bearer(read_token)).status_code == 200
    )


def test_the_answer_is_capped(
    client: Client, bob_token: str, read_token: str, monkeypatch: Any
) -> None:
    from transfers.dicomweb import search

    for _ in range(3):
        study_upload(client, bob_token, sources=ONE)
    monkeypatch.setattr(search, "MAX_RESULTS", 2)
    answer = _get(client, read_token, "studies", limit="50")
    assert len(answer.json()) == 2
    assert "additional results" in answer["Warning"]


def test_a_search_takes_the_same_few_statements_for_any_number_of_studies(
    client: Client, bob_token: str, read_token: str
) -> None:
    study_upload(client, bob_token, sources=ONE)
    captured_last: list[dict[str, str]] = []

    def statements() -> tuple[int, int]:
        with CaptureQueriesContext(connection) as captured:
            answer = _get(client, read_token, "studies", PatientName="DOE*", includefield="all")
            assert answer.status_code == 200
        captured_last[:] = captured.captured_queries
        return len(captured.captured_queries), len(answer.json())

    statements()  # the token's last-used mark is written on its first use in a minute
    one = statements()
    study_upload(client, bob_token, sources=ONE)
    study_upload(client, bob_token, sources=ONE)
    three = statements()
    assert (one[1], three[1]) == (1, 3)
    assert three[0] == one[0]
    # The token's look-up and the search itself.
    assert three[0] <= 2, [q["sql"] for q in captured_last]


def test_searches_and_retrievals_answer_get_only(
    client: Client, read_token: str, ct_study: UploadedStudy
) -> None:
    # /studies and /studies/{S} take POST: STOW-RS (test_stow.py).
    for path in ("series", f"studies/{ct_study.uid}/metadata"):
        answer = client.post(f"/dicom-web/{path}", **bearer(read_token))
        assert answer.status_code == 405, path
    assert client.head("/dicom-web/studies", **bearer(read_token)).status_code == 200
