"""The index at scale (issue 17, item 7): the worklist, the home page and QIDO-RS searches on
100,000 studies, about 400,000 series and 10,000,000 instances in PostgreSQL.

    .venv/bin/python bench/index_scale.py            # or: bench/run.py --only index
    .venv/bin/python bench/index_scale.py --keep     # leave relay_bench_index for psql
    .venv/bin/python bench/index_scale.py --reuse    # time a kept database again (no fill)

Runs in its own throwaway PostgreSQL database (relay_bench_index on the server of DATABASE_URL,
or 127.0.0.1:5432 as user postgres), migrated from scratch and dropped afterwards, like the
billing benchmark (bench/invoicing.py). The fill (`index_fill`, run inside Django in a child
process) writes 30 facilities with one member each, the studies with COPY from Python, the
series with COPY, and the instances with one `INSERT ... SELECT ... generate_series` per batch
of series in SQL: ten million rows built by the server itself take a fraction of what
ten million rows sent over COPY would. The instance table's secondary indexes and unique
constraints are dropped for the load and made again afterwards (one sort each instead of ten
million index insertions), and foreign keys are not checked row by row during it
(`session_replication_role = replica`): the data is consistent by construction. Then shares
of some studies with other facilities, and ANALYZE.

Then `index_time` signs in as a member (sender) of the largest facility and asks every common
search through Django's test client, so the very view code runs: the worklist (ours and shared
with us), the home page, and QIDO-RS at study, series and instance level, each 60 times with
values drawn from the data (surname prefixes, patient IDs, month-long date ranges, modalities).
Per search: the view's p50 / p95 wall time and the p95 of the time spent in SQL (measured with
a connection execute wrapper). The SQL statements of one request of each search that read the
study, series or instance tables are run again under EXPLAIN (ANALYZE, BUFFERS) and written to
bench/out/index_plans.txt; the table names which scans each one used.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time as clock
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from servers import scratch_relay_run

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
PYTHON = REPO / ".venv" / "bin" / "python"
DB_NAME = "relay_bench_index"
FACILITIES = 30
STUDIES = 100_000
INSTANCES = 10_000_000
RUNS = 60
AIM_MS = 50.0

# --- the data -----------------------------------------------------------------------------------

# (modality, share of studies, series per study (low, high), instances per series (low, high))
KINDS = [
    ("CT", 25, (3, 8), (60, 400)),
    ("MR", 15, (6, 12), (20, 60)),
    ("CR", 18, (1, 3), (1, 2)),
    ("DX", 10, (1, 3), (1, 3)),
    ("US", 12, (1, 2), (10, 60)),
    ("MG", 8, (1, 2), (4, 4)),
    ("NM", 3, (2, 4), (1, 120)),
    ("PT", 3, (3, 5), (100, 300)),
    ("XA", 4, (2, 6), (10, 80)),
    ("RF", 2, (1, 3), (5, 40)),
]
SURNAMES = (
    "Smith Johnson Williams Brown Jones Miller Davis Garcia Rodriguez Wilson Martinez Anderson "
    "Taylor Thomas Hernandez Moore Martin Jackson Thompson White Lopez Lee Gonzalez Harris Clark "
    "Lewis Robinson Walker Perez Hall Young Allen Sanchez Wright King Scott Green Baker Adams "
    "Nelson Hill Ramirez Campbell Mitchell Roberts Carter Phillips Evans Turner Torres Parker "
    "Collins Edwards Stewart Flores Morris Nguyen Murphy Rivera Cook Rogers Morgan Peterson "
    "Cooper Reed Bailey Bell Gomez Kelly Howard Ward Cox Diaz Richardson Wood Watson Brooks "
    "Bennett Gray James Reyes Cruz Hughes Price Myers Long Foster Sanders Ross Morales Powell "
    "Sullivan Russell Ortiz Jenkins Gutierrez Perry Butler Barnes Fisher Henderson Coleman"
).split()
SYLLABLES = (
    "an ber cal dor el fen gar hol is jor kel lam mor nor ol pet quin ros sal tor ul ven wes "
    "yar zel bro cha dri ste tha wil mac kin son ham ley ford berg stad"
).split()
GIVEN = (
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara "
    "Richard Susan Joseph Jessica Thomas Sarah Charles Karen Daniel Lisa Matthew Nancy Anthony "
    "Betty Mark Sandra Donald Ashley Steven Emily Paul Donna Andrew Michelle Joshua Carol"
).split()
DESCRIPTIONS = {
    "CT": ["CT HEAD W/O", "CT CHEST W CONTRAST", "CT ABD/PELVIS", "CTA CHEST PE"],
    "MR": ["MRI BRAIN W/WO", "MRI L-SPINE", "MRI KNEE RT", "MRI SHOULDER LT"],
    "CR": ["XR CHEST 2V", "XR HAND 3V", "XR ANKLE"],
    "DX": ["DX CHEST PA", "DX PELVIS"],
    "US": ["US ABDOMEN", "US OB >14 WKS", "US CAROTID"],
    "MG": ["MAMMO SCREENING BIL", "MAMMO DIAG"],
    "NM": ["NM BONE SCAN", "NM MYOCARDIAL PERF"],
    "PT": ["PET/CT SKULL-THIGH"],
    "XA": ["CARDIAC CATH", "ANGIO PERIPHERAL"],
    "RF": ["FLUORO UGI", "FLUORO ESOPHAGRAM"],
}


def _weights() -> list[float]:
    """Facility sizes as in the region: one regional centre, one big clinic, a few hospitals,
    many small ones."""
    return [20.0, 10.0, 5.0, 5.0, 5.0] + [2.0] * (FACILITIES - 5)


def _surname(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(SURNAMES)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).title()


@dataclass
class Filled:
    facilities: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    shares: int = 0
    shared_studies: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    sizes_mib: dict[str, float] = field(default_factory=dict)


def facilities_with_senders(prefix: str, count: int) -> tuple[list[Any], list[Any]]:
    """`count` facilities ("<Prefix> facility NN", slug "<prefix>-NN"), each with one sender;
    the facilities and their senders."""
    from django.db import transaction

    from portal.models import Facility, Membership, User

    with transaction.atomic():
        facilities = Facility.objects.bulk_create(
            Facility(
                name=f"{prefix.title()} facility {i:02d}",
                slug=f"{prefix}-{i:02d}",
                ae_title=f"{prefix.upper()[:12]}{i:02d}",
            )
            for i in range(count)
        )
        users = User.objects.bulk_create(
            User(email=f"member-{i:02d}@{prefix}.example", full_name=f"Member {i:02d}")
            for i in range(count)
        )
        Membership.objects.bulk_create(
            Membership(user=u, facility=f, role="sender")
            for u, f in zip(users, facilities, strict=True)
        )
    return facilities, users


def index_fill(*, seed: int = 7, studies: int = STUDIES, instances: int = INSTANCES) -> Filled:
    """Fill the (empty, migrated) database: facilities and members, studies, series, instances,
    shares; ANALYZE. Only for a throwaway database."""
    from django.db import connection, transaction

    rng = random.Random(seed)  # noqa: S311 - benchmark data, not secrets
    filled = Filled()
    started = clock.perf_counter()
    facilities, users = facilities_with_senders("bench", FACILITIES)
    filled.facilities = len(facilities)

    # Studies and series, with explicit primary keys so that the series can name their study.
    weights = _weights()
    first_day = date(2021, 1, 1)
    days = (date(2025, 12, 31) - first_day).days
    kinds = [k for k in KINDS for _ in range(k[1])]
    study_rows: list[list[Any]] = []
    series_rows: list[list[Any]] = []
    patients: dict[int, list[tuple[str, str, date, str]]] = {}
    for n in range(1, studies + 1):
        facility = rng.choices(facilities, weights)[0]
        known = patients.setdefault(facility.pk, [])
        if known and rng.random() < 0.6:  # a patient seen before
            name, pid, birth, sex = rng.choice(known)
        else:
            name = f"{_surname(rng)}^{rng.choice(GIVEN)}"
            if rng.random() < 0.5:
                name = name.upper()  # modalities write upper case, many other senders do not
            pid = f"MRN{facility.pk:02d}{len(known):07d}"
            birth = date(1930, 1, 1) + timedelta(days=rng.randrange(90 * 365))
            sex = rng.choice("FM")
            known.append((name, pid, birth, sex))
        modality, _, series_range, instance_range = rng.choice(kinds)
        extra = ["CT"] if modality == "PT" else []
        study_date = first_day + timedelta(days=rng.randrange(days))
        created = datetime.combine(study_date, datetime.min.time(), tzinfo=UTC) + timedelta(
            hours=rng.randrange(8, 20), minutes=rng.randrange(60)
        )
        nseries = rng.randint(*series_range)
        counts = [rng.randint(*instance_range) for _ in range(nseries)]
        with_sr = rng.random() < 0.2
        mods = sorted({modality, *extra, *(["SR"] if with_sr else [])})
        uid = f"2.25.{uuid.uuid4().int}"
        for s, count in enumerate(counts + ([1] if with_sr else []), start=1):
            series_modality = "SR" if with_sr and s == len(counts) + 1 else modality
            series_rows.append(
                [len(series_rows) + 1, n, f"{uid}.{s}", series_modality, s, "", "", count, created]
            )
        purged = created + timedelta(days=90) if rng.random() < 0.05 else None
        receiving = n > studies - 300 and rng.random() < 0.5
        study_rows.append(
            [
                n, uuid.uuid4(), facility.pk, uid, name, pid, birth, sex,
                f"A{n:09d}", str(n % 10000), study_date,
                (created.time().replace(tzinfo=None)), rng.choice(DESCRIPTIONS[modality]),
                "," + ",".join(mods) + ",", len(counts) + int(with_sr),
                "receiving" if receiving else "complete", created, created,
                None if receiving else created, purged,
            ]
        )  # fmt: skip
    # Scale the instance counts to the total asked for (each series keeps at least one).
    raw_total = sum(row[7] for row in series_rows)
    factor = instances / raw_total
    for row in series_rows:
        row[7] = max(1, round(row[7] * factor))
    per_study: dict[int, int] = {}
    for row in series_rows:
        per_study[row[1]] = per_study.get(row[1], 0) + row[7]
    for row in study_rows:
        row.append(per_study[row[0]])
    filled.seconds["studies and series, made in Python"] = round(clock.perf_counter() - started, 1)

    step = clock.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:
        raw = cursor.cursor
        with raw.copy(
            "COPY transfers_study (id, uuid, facility_id, study_instance_uid, patient_name,"
            " patient_id, patient_birth_date, patient_sex, accession_number, study_id, study_date,"
            " study_time, description, modalities, num_series, status, created_at,"
            " last_received_at, completed_at, purged_at, num_instances, issuer_of_patient_id,"
            " referring_physician, size_bytes, purged_bytes, received_from_ae,"
            " reconcile_running) FROM STDIN"
        ) as copy:
            for row in study_rows:
                copy.write_row([*row, "", "", row[-1] * 525_000, 0, "", False])
        with raw.copy(
            "COPY transfers_series (id, study_id, series_instance_uid, modality, series_number,"
            " description, body_part, num_instances, created_at, size_bytes) FROM STDIN"
        ) as copy:
            for row in series_rows:
                copy.write_row([*row, row[7] * 525_000])
        for table in ("transfers_study", "transfers_series"):
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"  # noqa: S608
            )
    filled.studies, filled.series = len(study_rows), len(series_rows)
    filled.seconds["studies and series, COPY"] = round(clock.perf_counter() - step, 1)

    step = clock.perf_counter()
    filled.instances = _instances_insert(len(series_rows))
    filled.seconds["instances, INSERT ... SELECT generate_series"] = round(
        clock.perf_counter() - step, 1
    )
    step = clock.perf_counter()
    _indexes_restore()
    filled.seconds["instance indexes and constraints, made again"] = round(
        clock.perf_counter() - step, 1
    )

    step = clock.perf_counter()
    filled.shares, filled.shared_studies = _shares_make(rng, facilities, users, study_rows)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
        for table in ("transfers_study", "transfers_series", "transfers_instance"):
            cursor.execute("SELECT pg_total_relation_size(%s)", [table])
            filled.sizes_mib[table] = round(cursor.fetchone()[0] / 2**20)
    filled.seconds["shares, VACUUM ANALYZE"] = round(clock.perf_counter() - step, 1)
    filled.seconds["total"] = round(clock.perf_counter() - started, 1)
    return filled


_SAVED: list[str] = []


def _instances_insert(series_count: int) -> int:
    """Ten million instance rows made by the server from the series rows: batches of series,
    each one INSERT ... SELECT over generate_series(1, num_instances)."""
    from django.db import connection, transaction

    with connection.cursor() as cursor:
        # Secondary indexes and unique constraints: dropped now, made again after the load.
        cursor.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'transfers_instance'::regclass AND contype = 'u'"
        )
        constraints = cursor.fetchall()
        cursor.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.tablename ="
            " 'transfers_instance' AND i.indexname NOT IN (SELECT conname FROM pg_constraint"
            " WHERE conrelid = 'transfers_instance'::regclass)"
        )
        indexes = cursor.fetchall()
        for name, definition in constraints:
            cursor.execute(f'ALTER TABLE transfers_instance DROP CONSTRAINT "{name}"')
            _SAVED.append(f'ALTER TABLE transfers_instance ADD CONSTRAINT "{name}" {definition}')
        for name, definition in indexes:
            cursor.execute(f'DROP INDEX "{name}"')
            _SAVED.append(definition)
    batch = 50_000
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("SET LOCAL synchronous_commit = off")
        for low in range(1, series_count + 1, batch):
            cursor.execute(
                """
                INSERT INTO transfers_instance (facility_id, series_id, sop_instance_uid,
                    sop_class_uid, transfer_syntax_uid, instance_number, size_bytes, sha256,
                    original_sha256, storage_key, "rows", "columns", number_of_frames,
                    created_at)
                SELECT st.facility_id, se.id, se.series_instance_uid || '.' || n,
                    '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', n, 525000,
                    lpad(to_hex(se.id::bigint * 100000 + n), 64, '0'), '',
                    'bench/' || st.facility_id || '/' || se.id || '/' || n, 512, 512, 1,
                    se.created_at
                FROM transfers_series se
                JOIN transfers_study st ON st.id = se.study_id,
                LATERAL generate_series(1, se.num_instances) AS n
                WHERE se.id BETWEEN %s AND %s
                ORDER BY se.id, n
                """,
                [low, low + batch - 1],
            )
        cursor.execute("SELECT count(*) FROM transfers_instance")
        return int(cursor.fetchone()[0])


def _indexes_restore() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '1GB'")
        for statement in _SAVED:
            cursor.execute(statement)
        cursor.execute("RESET maintenance_work_mem")
    _SAVED.clear()


def _shares_make(
    rng: random.Random, facilities: list[Any], users: list[Any], study_rows: list[list[Any]]
) -> tuple[int, int]:
    """Facility-to-facility shares of one to three studies each: about 5 % of all studies,
    four in five still active; the largest facility receives its share of them."""
    from django.db import transaction

    from transfers.models import Share

    by_facility: dict[int, list[int]] = {}
    for row in study_rows:
        by_facility.setdefault(row[2], []).append(row[0])
    now = datetime.now(UTC)
    shares: list[Share] = []
    chosen: list[list[int]] = []
    for _ in range(len(study_rows) // 40):
        sender, recipient = rng.sample(range(len(facilities)), 2)
        if rng.random() < 0.3:
            recipient = 0  # the regional centre receives more than its share
            sender = sender if sender != 0 else 1
        active = rng.random() < 0.8
        created = now - timedelta(days=rng.randrange(1, 200))
        shares.append(
            Share(
                facility=facilities[sender],
                created_by=users[sender],
                kind="facility",
                recipient_facility=facilities[recipient],
                created_at=created,
                expires_at=now + timedelta(days=rng.randrange(1, 60))
                if active
                else created + timedelta(days=30),
                can_download=rng.random() < 0.5,
                notify_status="sent",
            )
        )
        chosen.append(rng.sample(by_facility[facilities[sender].pk], rng.randint(1, 3)))
    with transaction.atomic():
        made = Share.objects.bulk_create(shares)
        through = Share.studies.through
        links = [
            through(share_id=share.pk, study_id=study)
            for share, picked in zip(made, chosen, strict=True)
            for study in picked
        ]
        through.objects.bulk_create(links)
    return len(made), len({link.study_id for link in links})


# --- the searches --------------------------------------------------------------------------------


@dataclass
class Timed:
    name: str
    path: str
    runs: int
    view_ms: list[float]
    sql_ms: list[float]
    statements: float
    scans: list[str]


def _study_sample(facility_id: int, rng: random.Random, count: int) -> list[dict[str, Any]]:
    from transfers.models import Study

    ids = list(Study.objects.filter(facility_id=facility_id).values_list("pk", flat=True))
    picked = rng.sample(ids, count)
    return [
        dict(row)
        for row in Study.objects.filter(pk__in=picked).values(
            "patient_name", "patient_id", "study_date", "study_instance_uid", "pk"
        )
    ]


def _searches(facility_id: int, rng: random.Random) -> list[tuple[str, list[str]]]:
    """(name, the RUNS paths to ask) of every common search, values drawn from the data."""
    from transfers.models import Instance, Series

    sample = _study_sample(facility_id, rng, RUNS)
    prefixes = [s["patient_name"].split("^")[0][:3] for s in sample]
    pids = [s["patient_id"] for s in sample]
    months = [s["study_date"] - timedelta(days=15) for s in sample]
    modalities = [m for m, *_ in KINDS] * RUNS
    series = {
        s["study_id"]: s
        for s in Series.objects.filter(study_id__in=[x["pk"] for x in sample]).values(
            "study_id", "series_instance_uid", "id"
        )
    }
    sop = dict(
        Instance.objects.filter(series_id__in=[s["id"] for s in series.values()])
        .order_by("series_id", "-instance_number")
        .distinct("series_id")
        .values_list("series_id", "sop_instance_uid")
    )

    def qido(path: str, **params: str) -> str:
        return f"/dicom-web/{path}?" + urlencode(
            {**params, "limit": "101", "includefield": "00081030,00080060"}
        )

    def worklist(**params: str) -> str:
        return "/studies/?" + urlencode(params)

    fmt = "%Y%m%d"
    return [
        ("worklist, ours, newest first", [worklist() for _ in range(RUNS)]),
        ("worklist, name prefix", [worklist(q=p) for p in prefixes]),
        ("worklist, patient ID", [worklist(q=p) for p in pids]),
        (
            "worklist, study date, one month",
            [worklist(**{"from": str(m), "to": str(m + timedelta(days=30))}) for m in months],
        ),
        ("worklist, modality", [worklist(modality=m) for m in modalities[:RUNS]]),
        ("worklist, shared with us", [worklist(show="received") for _ in range(RUNS)]),
        (
            "worklist, shared with us, name prefix",
            [worklist(show="received", q=p) for p in prefixes],
        ),
        ("home page", ["/" for _ in range(RUNS)]),
        ("QIDO studies, all (facility)", [qido("studies") for _ in range(RUNS)]),
        (
            "QIDO studies, PatientName=pre*",
            [qido("studies", PatientName=f"{p}*") for p in prefixes],
        ),
        ("QIDO studies, PatientID", [qido("studies", PatientID=p) for p in pids]),
        (
            "QIDO studies, StudyDate range",
            [
                qido("studies", StudyDate=f"{m:{fmt}}-{m + timedelta(days=30):{fmt}}")
                for m in months
            ],
        ),
        (
            "QIDO studies, ModalitiesInStudy",
            [qido("studies", ModalitiesInStudy=m) for m in modalities[:RUNS]],
        ),
        ("QIDO series, Modality", [qido("series", Modality=m) for m in modalities[:RUNS]]),
        (
            "QIDO series of a study",
            [f"/dicom-web/studies/{s['study_instance_uid']}/series" for s in sample],
        ),
        (
            "QIDO instances of a series",
            [
                f"/dicom-web/studies/{s['study_instance_uid']}/series/"
                f"{series[s['pk']]['series_instance_uid']}/instances"
                for s in sample
            ],
        ),
        ("QIDO instances, PatientID", [qido("instances", PatientID=p) for p in pids]),
        (
            "QIDO instances, SOPInstanceUID",
            [qido("instances", SOPInstanceUID=uid) for uid in list(sop.values())[:RUNS]],
        ),
    ]


_BIG_TABLES = ("transfers_study", "transfers_series", "transfers_instance")


def _scans(plan: str) -> list[str]:
    """The scan nodes of a plan on the study, series and instance tables, one line each."""
    found = []
    for line in plan.splitlines():
        text = line.strip().removeprefix("->").strip()
        bitmap = text.startswith("Bitmap Index Scan on study_")  # names no table
        if not bitmap and (" on transfers_" not in text or not any(t in text for t in _BIG_TABLES)):
            continue
        node = text.split("  (")[0]
        rows = ""
        if "actual time" in text and "rows=" in text.split("actual time")[1]:
            rows = " rows=" + text.split("actual time")[1].split("rows=")[1].split()[0]
        found.append(node + rows)
    return found


def index_time(*, plans_path: Path) -> list[Timed]:
    """Time every common search as the largest facility's sender sees it; write the plans."""
    from django.db import connection
    from django.test import Client

    from portal.models import Membership

    rng = random.Random(11)  # noqa: S311
    member = Membership.objects.select_related("user").get(facility__slug="bench-00")
    client = Client(HTTP_ACCEPT="application/dicom+json, text/html")
    client.force_login(member.user)
    results: list[Timed] = []
    plan_lines: list[str] = []
    for name, paths in _searches(member.facility_id, rng):
        for path in paths[:3]:  # warm-up: caches, first-use imports
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)
        view_ms: list[float] = []
        sql_ms: list[float] = []
        statements: list[int] = []
        captured: list[tuple[str, Any, float]] = []
        for n, path in enumerate(paths):
            recorded: list[tuple[str, Any, float]] = []

            def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
                began = clock.perf_counter()
                try:
                    return execute(sql, params, many, context)
                finally:
                    recorded.append((sql, params, clock.perf_counter() - began))  # noqa: B023

            began = clock.perf_counter()
            with connection.execute_wrapper(wrapper):
                response = client.get(path)
            view_ms.append((clock.perf_counter() - began) * 1000)
            assert response.status_code == 200, (path, response.status_code)
            sql_ms.append(sum(r[2] for r in recorded) * 1000)
            statements.append(len(recorded))
            if n == len(paths) // 2:
                captured = list(recorded)
                captured_path = path
        scans: list[str] = []
        plan_lines += ["=" * 100, f"{name}: GET {captured_path}", "=" * 100]
        with connection.cursor() as cursor:
            for sql, params, seconds in captured:
                if not any(t in sql for t in _BIG_TABLES) or not sql.lstrip().startswith("SELECT"):
                    continue
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                plan = "\n".join(row[0] for row in cursor.fetchall())
                plan_lines += [
                    f"-- {seconds * 1000:.2f} ms in the view",
                    cursor.mogrify(sql, params)
                    if hasattr(cursor, "mogrify")
                    else f"{sql} {params!r}",
                    plan,
                    "",
                ]
                scans += _scans(plan)
        results.append(
            Timed(
                name=name,
                path=captured_path,
                runs=len(paths),
                view_ms=[round(x, 2) for x in view_ms],
                sql_ms=[round(x, 2) for x in sql_ms],
                statements=statistics.median(statements),
                scans=list(dict.fromkeys(scans)),
            )
        )
        print(f"  {name}: p95 {_p95(view_ms):.1f} ms", file=sys.stderr, flush=True)
    plans_path.parent.mkdir(parents=True, exist_ok=True)
    plans_path.write_text("\n".join(str(line) for line in plan_lines) + "\n")
    return results


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


# --- the section (no Django in this process) ----------------------------------------------------


def index_section(
    *,
    studies: int = STUDIES,
    instances: int = INSTANCES,
    keep: bool = False,
    reuse: bool = False,
    plans: Path = OUT / "index_plans.txt",
) -> dict[str, Any]:
    def code(var: Path) -> str:
        fill = (
            "None"
            if reuse
            else f"asdict(index_scale.index_fill(studies={studies}, instances={instances}))"
        )
        return (
            "import index_scale\n"
            f"fill = {fill}\n"
            f"timed = [asdict(t) for t in index_scale.index_time(plans_path=Path({str(plans)!r}))]\n"
            "print('INDEX-BENCH ' + json.dumps({'fill': fill, 'timed': timed}))\n"
        )

    result = scratch_relay_run(
        DB_NAME,
        code,
        mark="INDEX-BENCH",
        env={"ALLOWED_HOSTS": "testserver"},
        keep=keep,
        reuse=reuse,
    )
    result["plans"] = str(plans)
    return result


def index_table(result: dict[str, Any]) -> str:
    lines = []
    fill = result["fill"]
    if fill:
        lines.append(
            f"index at scale on PostgreSQL: {fill['facilities']} facilities, "
            f"{fill['studies']:,} studies, {fill['series']:,} series, "
            f"{fill['instances']:,} instances, {fill['shares']:,} shares of "
            f"{fill['shared_studies']:,} studies; tables "
            + ", ".join(
                f"{k.removeprefix('transfers_')} {v:,} MiB" for k, v in fill["sizes_mib"].items()
            )
        )
        lines.append("fill: " + ", ".join(f"{k} {v} s" for k, v in fill["seconds"].items()))
    lines.append(
        f"as the sender of the largest facility, {RUNS} requests each through Django's test "
        f"client (values drawn from the data); aim p95 < {AIM_MS:.0f} ms"
    )
    rows = [["search", "p50 ms", "p95 ms", "SQL p95 ms", "statements", "aim", "scans"]]
    for t in result["timed"]:
        p95 = _p95(t["view_ms"])
        rows.append(
            [
                t["name"],
                f"{statistics.median(t['view_ms']):.1f}",
                f"{p95:.1f}",
                f"{_p95(t['sql_ms']):.1f}",
                f"{t['statements']:.0f}",
                "met" if p95 < AIM_MS else "NOT met",
                "; ".join(sorted(set(s.split(" rows=")[0] for s in t["scans"]))),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for n, row in enumerate(rows):
        cells = [
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row[:-1])
        ]
        lines.append("| " + " | ".join(cells) + " | " + row[-1])
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append(f"plans: {result['plans']}")
    return "\n".join(lines)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help=f"keep {DB_NAME} afterwards")
    parser.add_argument("--reuse", action="store_true", help=f"time a kept {DB_NAME}, no fill")
    parser.add_argument("--studies", type=int, default=STUDIES)
    parser.add_argument("--instances", type=int, default=INSTANCES)
    args = parser.parse_args()
    result = index_section(
        studies=args.studies, instances=args.instances, keep=args.keep, reuse=args.reuse
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "index_results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(index_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
