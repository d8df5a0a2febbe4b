"""The purge at scale (issue 18, item 4): 1,000,000 instances of studies whose shares have lapsed,
purged by Relay's own purge (`transfers.purge.purge_expired`, what the daily task and
`manage.py purge_expired` run), with every stored object a real file.

    .venv/bin/python bench/purge_scale.py                    # or, once wired: bench/run.py --only purge
    .venv/bin/python bench/purge_scale.py --instances 100000 # a smaller run

Runs in its own throwaway PostgreSQL database (relay_bench_purge on the server of DATABASE_URL,
or 127.0.0.1:5432 as user postgres), migrated from scratch and dropped afterwards, like the
billing and index benchmarks; the objects live in a temporary folder (Relay's folder storage,
MEDIA_ROOT) removed afterwards. The fill (`purge_fill`, in a child process with Django set up)
writes 30 facilities, studies and series with COPY, the instances with one
`INSERT ... SELECT ... generate_series` per batch of series (the way bench/index_scale.py does),
one small file per instance at its storage key, and one facility-to-facility share per study
that lapsed 10 days ago; every study's last image arrived 400 days ago (past every retention).

Then `purge_time` runs `shares_mark_expired` (the EXPIRED receipts) and `purge_expired`, timed
apart, counting the SQL statements each sends (a connection execute wrapper), and checks what a
purge must leave: no instance rows, no files, one PURGE audit event and a PURGED receipt per
study, the bytes freed on each tombstone.
"""

from __future__ import annotations

import json
import os
import sys
import time as clock
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from index_scale import facilities_with_senders
from measure import aim_table
from servers import scratch_relay_run

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
PYTHON = REPO / ".venv" / "bin" / "python"
DB_NAME = "relay_bench_purge"
FACILITIES = 30
INSTANCES = 1_000_000
PER_STUDY = 100  # instances per study, in SERIES_PER_STUDY series
SERIES_PER_STUDY = 4
OBJECT_BYTES = 64  # each file's size on disk; the rows say 525,000 (a CT slice)
ROW_BYTES = 525_000
AIM_S = 300.0


@dataclass
class PurgeFilled:
    facilities: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    files: int = 0
    shares: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PurgeTimed:
    mark_expired_s: float = 0.0
    mark_expired_statements: int = 0
    shares_marked: int = 0
    purge_s: float = 0.0
    purge_statements: int = 0
    studies_purged: int = 0
    objects_deleted: int = 0
    bytes_freed: int = 0
    failed: int = 0
    instances_per_s: float = 0.0
    # What is left afterwards (all must be 0 but the audit events and receipts, one per study).
    instances_left: int = -1
    files_left: int = -1
    purge_events: int = 0
    purged_receipts: int = 0


def purge_fill(*, instances: int = INSTANCES, media: Path) -> PurgeFilled:
    """Fill the (empty, migrated) database and the folder `media`. Only for throwaway ones."""
    from django.db import connection, transaction

    from transfers.models import Share

    filled = PurgeFilled()
    started = clock.perf_counter()
    now = datetime.now(UTC)
    received = now - timedelta(days=400)
    lapsed = now - timedelta(days=10)
    facilities, users = facilities_with_senders("purge", FACILITIES)
    filled.facilities = len(facilities)

    studies = max(1, instances // PER_STUDY)
    per_series = PER_STUDY // SERIES_PER_STUDY
    study_rows: list[list[Any]] = []
    series_rows: list[list[Any]] = []
    left = instances
    for n in range(1, studies + 1):
        facility = facilities[n % FACILITIES]
        count = PER_STUDY if n < studies else left
        left -= count
        uid = f"2.25.{uuid.uuid4().int}"
        sizes = [per_series] * (SERIES_PER_STUDY - 1)
        sizes.append(count - sum(sizes))
        for s, size in enumerate(sizes, start=1):
            series_rows.append(
                [len(series_rows) + 1, n, f"{uid}.{s}", "CT", s, "", "", size, received]
            )
        study_rows.append(
            [
                n, uuid.uuid4(), facility.pk, uid, f"PURGE^PATIENT{n}", f"MRN{n:08d}",
                "CT", ",CT,", len(sizes), "complete", received, received, received, count,
            ]
        )  # fmt: skip
    with transaction.atomic(), connection.cursor() as cursor:
        raw = cursor.cursor
        with raw.copy(
            "COPY transfers_study (id, uuid, facility_id, study_instance_uid, patient_name,"
            " patient_id, description, modalities, num_series, status, created_at,"
            " last_received_at, completed_at, num_instances, size_bytes, purged_bytes,"
            " patient_sex, accession_number, study_id, issuer_of_patient_id,"
            " referring_physician, received_from_ae, reconcile_running) FROM STDIN"
        ) as copy:
            for row in study_rows:
                copy.write_row([*row, row[-1] * ROW_BYTES, 0, "", "", "", "", "", "", False])
        with raw.copy(
            "COPY transfers_series (id, study_id, series_instance_uid, modality, series_number,"
            " description, body_part, num_instances, created_at, size_bytes) FROM STDIN"
        ) as copy:
            for row in series_rows:
                copy.write_row([*row, row[7] * ROW_BYTES])
        for table in ("transfers_study", "transfers_series"):
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"  # noqa: S608
            )
        batch = 20_000
        for low in range(1, len(series_rows) + 1, batch):
            cursor.execute(
                """
                INSERT INTO transfers_instance (facility_id, series_id, sop_instance_uid,
                    sop_class_uid, transfer_syntax_uid, instance_number, size_bytes, sha256,
                    original_sha256, storage_key, "rows", "columns", number_of_frames,
                    created_at)
                SELECT st.facility_id, se.id, se.series_instance_uid || '.' || n,
                    '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', n, %s,
                    lpad(to_hex(se.id::bigint * 100000 + n), 64, '0'), '',
                    'dicom/' || f.uuid || '/' || st.study_instance_uid || '/'
                        || se.series_instance_uid || '/' || se.series_instance_uid || '.' || n,
                    512, 512, 1, se.created_at
                FROM transfers_series se
                JOIN transfers_study st ON st.id = se.study_id
                JOIN portal_facility f ON f.id = st.facility_id,
                LATERAL generate_series(1, se.num_instances) AS n
                WHERE se.id BETWEEN %s AND %s
                ORDER BY se.id, n
                """,
                [ROW_BYTES, low, low + batch - 1],
            )
    filled.studies, filled.series = len(study_rows), len(series_rows)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM transfers_instance")
        filled.instances = int(cursor.fetchone()[0])
    filled.seconds["studies, series and instances (COPY, INSERT ... SELECT)"] = round(
        clock.perf_counter() - started, 1
    )

    # One facility-to-facility share per study, lapsed ten days ago.
    step = clock.perf_counter()
    with transaction.atomic():
        made = Share.objects.bulk_create(
            (
                Share(
                    facility_id=row[2],
                    created_by=users[(row[0]) % FACILITIES],
                    kind="facility",
                    recipient_facility=facilities[(row[0] + 1) % FACILITIES],
                    created_at=received,
                    expires_at=lapsed,
                    notify_status="sent",
                )
                for row in study_rows
            ),
            batch_size=5000,
        )
        through = Share.studies.through
        through.objects.bulk_create(
            (
                through(share_id=share.pk, study_id=row[0])
                for share, row in zip(made, study_rows, strict=True)
            ),
            batch_size=5000,
        )
    filled.shares = len(made)
    filled.seconds["shares"] = round(clock.perf_counter() - step, 1)

    # The objects: one small file per instance where the folder storage keeps it.
    step = clock.perf_counter()
    payload = b"\0" * OBJECT_BYTES
    made_dirs: set[str] = set()
    with transaction.atomic():
        connection.ensure_connection()
        raw = connection.connection.cursor(name="keys")  # server-side: a million keys, streamed
        raw.itersize = 20_000
        raw.execute("SELECT storage_key FROM transfers_instance ORDER BY id")
        for (key,) in raw:
            folder, _, _ = key.rpartition("/")
            if folder not in made_dirs:
                os.makedirs(media / folder, mode=0o700, exist_ok=True)
                made_dirs.add(folder)
            fd = os.open(media / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, payload)
            os.close(fd)
            filled.files += 1
        raw.close()
    filled.seconds["files"] = round(clock.perf_counter() - step, 1)
    step = clock.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    filled.seconds["VACUUM ANALYZE"] = round(clock.perf_counter() - step, 1)
    filled.seconds["total"] = round(clock.perf_counter() - started, 1)
    return filled


def purge_time(*, media: Path) -> PurgeTimed:
    """Run the shares' expiry and the purge as the daily task does; time and check them."""
    from django.db import connection

    from portal.models import AuditAction, AuditEvent
    from transfers.models import Instance, ShareEvent, ShareEventKind
    from transfers.purge import purge_expired
    from transfers.sharing.expiry import shares_mark_expired

    timed = PurgeTimed()
    count = [0]

    def counting(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        count[0] += 1
        return execute(sql, params, many, context)

    with connection.execute_wrapper(counting):
        began = clock.perf_counter()
        timed.shares_marked = shares_mark_expired()
        timed.mark_expired_s = round(clock.perf_counter() - began, 2)
        timed.mark_expired_statements, count[0] = count[0], 0
        began = clock.perf_counter()
        result = purge_expired()
        timed.purge_s = round(clock.perf_counter() - began, 2)
        timed.purge_statements = count[0]
    timed.studies_purged = result.studies_purged
    timed.objects_deleted = result.objects_deleted
    timed.bytes_freed = result.bytes_freed
    timed.failed = len(result.failed)
    timed.instances_per_s = round(timed.objects_deleted / timed.purge_s) if timed.purge_s else 0
    timed.instances_left = Instance.objects.count()
    timed.files_left = sum(len(files) for _, _, files in os.walk(media / "dicom"))
    timed.purge_events = AuditEvent.objects.filter(action=AuditAction.PURGE).count()
    timed.purged_receipts = ShareEvent.objects.filter(kind=ShareEventKind.PURGED).count()
    return timed


# --- the section (no Django in this process) ----------------------------------------------------


def purge_section(*, instances: int = INSTANCES, keep: bool = False) -> dict[str, Any]:
    """Fill a throwaway database and folder, purge, and return the figures (no Django here)."""

    def code(var: Path) -> str:
        return (
            "import purge_scale\n"
            f"media = Path({str(var / 'media')!r})\n"
            f"fill = asdict(purge_scale.purge_fill(instances={instances}, media=media))\n"
            "print('filled: ' + json.dumps(fill['seconds']), file=sys.stderr, flush=True)\n"
            "timed = asdict(purge_scale.purge_time(media=media))\n"
            "print('PURGE-BENCH ' + json.dumps({'fill': fill, 'timed': timed}))\n"
        )

    # Not a log line per purged study.
    result = scratch_relay_run(
        DB_NAME, code, mark="PURGE-BENCH", env={"LOG_LEVEL": "WARNING"}, keep=keep
    )
    result["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    return result


def purge_table(result: dict[str, Any]) -> str:
    fill, timed = result["fill"], result["timed"]
    rows = [
        (
            "instances / studies / facilities",
            f"{fill['instances']:,} / {fill['studies']:,} / {fill['facilities']}",
            "",
        ),
        ("objects (files) / lapsed shares", f"{fill['files']:,} / {fill['shares']:,}", ""),
        ("fill, s", f"{fill['seconds']['total']:.0f}", ""),
        (
            "shares_mark_expired, s (statements)",
            f"{timed['mark_expired_s']:.1f} ({timed['mark_expired_statements']:,})",
            "",
        ),
        (
            "purge_expired, s (statements)",
            f"{timed['purge_s']:.1f} ({timed['purge_statements']:,})",
            f"< {AIM_S:.0f} s",
        ),
        ("instances purged per second", f"{timed['instances_per_s']:,.0f}", ""),
        (
            "studies purged / objects deleted / GB freed",
            f"{timed['studies_purged']:,} / {timed['objects_deleted']:,} / "
            f"{timed['bytes_freed'] / 1e9:,.1f}",
            "",
        ),
        (
            "left: instance rows / files (must be 0)",
            f"{timed['instances_left']:,} / {timed['files_left']:,}",
            "0 / 0",
        ),
        (
            "PURGE audit events / PURGED receipts",
            f"{timed['purge_events']:,} / {timed['purged_receipts']:,}",
            "one per study",
        ),
    ]
    return aim_table("purge on PostgreSQL, folder storage", rows)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=INSTANCES)
    parser.add_argument("--keep", action="store_true", help=f"keep {DB_NAME} afterwards")
    args = parser.parse_args()
    result = purge_section(instances=args.instances, keep=args.keep)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "purge_results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(purge_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
