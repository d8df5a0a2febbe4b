"""Several senders into one series at once (a modality's parallel associations, an uploader's
threads, a STOW-RS request beside single uploads): every instance is stored and counted, none
refused because the database chose one of two writers as a deadlock victim.

Each single-object write updates the series' counters, then the study's (transfers/ingest.py
`_write_one` on PostgreSQL, `_count` elsewhere, the batches too): two writers that took the
rows in opposite orders would each wait for the other. Measured before the fix: the benchmark's
four parallel associations into one study lost instances to "deadlock detected" (0xA700).
"""

from __future__ import annotations

import threading

import pytest
from django.db import connections

from portal.models import Facility
from tests.helpers import dicom_bytes, require_postgresql
from transfers.ingest import STORED, IngestBatch, instance_ingest
from transfers.models import Series, Study

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 6
PER_THREAD = 25


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    require_postgresql("SQLite takes one writer at a time (CI runs the suite with DATABASE_URL)")


def test_parallel_writers_into_one_series_all_store_and_count(krmc: Facility) -> None:
    files = [dicom_bytes() for _ in range(THREADS * PER_THREAD + 1)]
    assert instance_ingest(facility=krmc, user=None, chunks=[files[0]]).status == STORED
    shares = [files[1 + i :: THREADS] for i in range(THREADS)]
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def send(share: list[bytes], batched: bool) -> None:
        """Alone, or two at a time in a batch (a multipart upload, STOW-RS)."""
        try:
            start.wait()
            for n in range(0, len(share), 2):
                with IngestBatch(facility=krmc, user=None, source="api", size=2) as batch:
                    results = [
                        instance_ingest(
                            facility=krmc,
                            user=None,
                            chunks=[data],
                            batch=batch if batched else None,
                        )
                        for data in share[n : n + 2]
                    ]
                with lock:
                    outcomes.extend(
                        f"{r.status}: {r.reason}" if r.reason else r.status for r in results
                    )
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=send, args=(share, n % 2 == 1)) for n, share in enumerate(shares)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    refused = [o for o in outcomes if o != STORED]
    assert refused == [] and len(outcomes) == THREADS * PER_THREAD
    study = Study.objects.get(facility=krmc)
    series = Series.objects.get(study=study)
    total = len(files)
    assert (study.num_instances, series.num_instances) == (total, total)
    assert study.size_bytes == series.size_bytes == sum(len(f) for f in files)
