# Indexes for the worklist, the home page and QIDO-RS at 100,000 studies / 10 million instances
# (issue 17, item 7; bench/index_scale.py measures them and writes the plans).
#
# The indexes in Study.Meta.indexes work on SQLite and PostgreSQL. Three more are PostgreSQL's
# own and made here only there:
# - trigram (pg_trgm) GIN indexes on the patient name, for the worklist's search box
#   (`UPPER(patient_name) LIKE UPPER('%word%')`, any part of the name) and QIDO's PatientName
#   wildcards (`patient_name ~* '^SMI.*$'`): a btree cannot answer "contains", and without them
#   every search reads every study of the facility;
# - QIDO's study order (`study_date DESC NULLS LAST, id`), so that a search without a selective
#   filter reads the newest studies first and stops at the page's end.
# pg_trgm ships with PostgreSQL and is a trusted extension (PostgreSQL 13+): the database's owner
# may create it. If it cannot be created the trigram indexes are left out and said so; searches
# then work as before, only slower.

from django.db import migrations, models, transaction
from django.db.models.functions import Upper

TRIGRAM = [
    "CREATE INDEX IF NOT EXISTS study_name_upper_trgm ON transfers_study"
    " USING gin (UPPER(patient_name::text) gin_trgm_ops)",
    "CREATE INDEX IF NOT EXISTS study_name_trgm ON transfers_study"
    " USING gin (patient_name gin_trgm_ops)",
]
ORDER = [
    "CREATE INDEX IF NOT EXISTS study_date_qido ON transfers_study"
    " (study_date DESC NULLS LAST, id)",
]
DROP = [
    "DROP INDEX IF EXISTS study_name_upper_trgm",
    "DROP INDEX IF EXISTS study_name_trgm",
    "DROP INDEX IF EXISTS study_date_qido",
]


def postgresql_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        for statement in ORDER:
            cursor.execute(statement)
        try:
            with transaction.atomic(using=schema_editor.connection.alias):
                cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except Exception as exc:  # noqa: BLE001 - a missing privilege, or contrib not installed
            print(
                f"\n  pg_trgm could not be created ({exc}); the name search works without its"
                " index, only slower. A superuser can run CREATE EXTENSION pg_trgm and then"
                " migrate transfers 0017 and 0018 again."
            )
            return
        for statement in TRIGRAM:
            cursor.execute(statement)


def postgresql_indexes_drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        for statement in DROP:
            cursor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [
        ("transfers", "0017_deidentified_copies"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="study",
            name="study_fac_date",
        ),
        migrations.AddIndex(
            model_name="study",
            index=models.Index(
                fields=["facility", "-study_date", "-study_time", "-id"],
                name="study_fac_date_order",
            ),
        ),
        migrations.AddIndex(
            model_name="study",
            index=models.Index(
                condition=models.Q(("reconcile_running", True)),
                fields=["facility", "-last_received_at"],
                name="study_fac_reconciling",
            ),
        ),
        migrations.AddIndex(
            model_name="study",
            index=models.Index(fields=["study_instance_uid"], name="study_uid"),
        ),
        migrations.AddIndex(
            model_name="study",
            index=models.Index(fields=["patient_id"], name="study_patient_id"),
        ),
        migrations.AddIndex(
            model_name="study",
            index=models.Index(Upper("patient_id"), name="study_patient_id_upper"),
        ),
        migrations.AddIndex(
            model_name="study",
            index=models.Index(Upper("accession_number"), name="study_accession_upper"),
        ),
        migrations.RunPython(postgresql_indexes, postgresql_indexes_drop, elidable=False),
    ]
