"""The purge works on groups of studies, their rows batched across the group (issue 18: 1
million instances purged in the benchmark, bench/purge_scale.py). What each study's sender and
auditor reads must not change: its own bytes freed on its own tombstone, one PURGE event each,
every object gone, and a run stopped halfway finished by the next without counting twice.

Batches of 2 rows over studies of 3 images make every batch but the first span two studies.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.storage import FileSystemStorage

from portal.models import AuditAction, AuditEvent, Facility, User
from transfers import purge
from transfers.models import Instance, Study
from transfers.purge import purge_expired

from .test_purge import _age, _expire, _keys, _share, _stored, _upload_study

pytestmark = pytest.mark.django_db


@pytest.fixture
def studies(client: Any, bob_token: str, bob: User, gfc: Facility) -> list[Study]:
    made = []
    for n in range(3):
        study = _upload_study(client, bob_token, StudyInstanceUID=f"1.2.826.0.1.3680043.8.498.6{n}")
        _expire(_share(bob, study, gfc))
        _age(study)
        made.append(study)
    return made


@pytest.fixture(autouse=True)
def _small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(purge, "BATCH_SIZE", 2)


def test_each_study_of_a_group_gets_its_own_bytes_and_one_purge_event(
    studies: list[Study],
) -> None:
    keys = [key for study in studies for key in _keys(study)]
    sizes = {study.uuid: study.size_bytes for study in studies}

    result = purge_expired()

    assert sorted(result.freed) == sorted((str(uuid), size) for uuid, size in sizes.items())
    assert result.objects_deleted == 9
    assert not any(_stored(keys))
    assert not Instance.objects.exists()
    for study in studies:
        tombstone = Study.objects.get(pk=study.pk)
        assert tombstone.purged_at is not None
        assert tombstone.purged_bytes == study.size_bytes
        (event,) = AuditEvent.objects.filter(
            action=AuditAction.PURGE, study_instance_uid=study.study_instance_uid
        )
        assert event.detail["bytes_freed"] == study.size_bytes
    assert purge_expired().studies_purged == 0


class StorageFailingAfterFour(FileSystemStorage):
    """A store that fails like an unreachable bucket after four deletes."""

    deletes = 0

    def delete(self, name: str) -> None:
        if StorageFailingAfterFour.deletes >= 4:
            raise OSError("connection reset by storage")
        StorageFailingAfterFour.deletes += 1
        super().delete(name)


def test_a_group_stopped_halfway_is_finished_by_the_next_run_counting_each_byte_once(
    settings: Any, studies: list[Study]
) -> None:
    keys = [key for study in studies for key in _keys(study)]
    working = settings.STORAGES
    settings.STORAGES = {
        **working,
        "default": {
            **working["default"],
            "BACKEND": "tests.transfers.test_purge_groups.StorageFailingAfterFour",
        },
    }
    StorageFailingAfterFour.deletes = 0

    stopped = purge_expired()

    # Two batches went (4 objects, 4 rows); a study they emptied is done and audited, the
    # others are reported unfinished and wait, claimed, for the next run.
    done = {s.uuid for s in stopped.studies}
    assert done | {uuid for uuid, _ in stopped.failed} == {str(s.uuid) for s in studies}
    assert not done & {uuid for uuid, _ in stopped.failed}
    assert stopped.failed
    assert _stored(keys).count(True) == 5
    assert Instance.objects.count() == 5
    assert Study.objects.filter(purged_at__isnull=True).count() == 0
    assert AuditEvent.objects.filter(action=AuditAction.PURGE).count() == len(done)

    settings.STORAGES = working
    finished = purge_expired()

    assert {s.uuid for s in finished.studies} == {str(s.uuid) for s in studies} - done
    assert not any(_stored(keys))
    for study in studies:
        assert Study.objects.get(pk=study.pk).purged_bytes == study.size_bytes
    assert AuditEvent.objects.filter(action=AuditAction.PURGE).count() == 3
