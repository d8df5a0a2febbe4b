"""The audit trail cannot be emptied with TRUNCATE either.

0002 refuses UPDATE and DELETE row by row; TRUNCATE fires no row triggers, so on PostgreSQL a
statement trigger refuses it too (also when it comes by `TRUNCATE portal_facility CASCADE`).
Only a superuser passes: the test runner empties tables with TRUNCATE as one, and a superuser
could drop the trigger anyway. Run the application under a role that owns none of the tables
(README, "Database roles"), so that it cannot drop or disable the triggers either.

On SQLite the UPDATE trigger of 0002 is made again if it is missing: a migration that rebuilds
the table (SQLite's way of altering most columns) drops its triggers.
"""

from django.db import migrations

PG_FORWARD = """
CREATE OR REPLACE FUNCTION portal_auditevent_no_truncate() RETURNS trigger AS $$
BEGIN
    IF NOT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false) THEN
        RAISE EXCEPTION 'the audit trail is append-only: TRUNCATE is refused';
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS portal_auditevent_no_truncate ON portal_auditevent;
CREATE TRIGGER portal_auditevent_no_truncate BEFORE TRUNCATE ON portal_auditevent
    FOR EACH STATEMENT EXECUTE FUNCTION portal_auditevent_no_truncate();
"""
PG_BACKWARD = """
DROP TRIGGER IF EXISTS portal_auditevent_no_truncate ON portal_auditevent;
DROP FUNCTION IF EXISTS portal_auditevent_no_truncate();
"""
# The same statement as 0002's, made only where it is missing.
SQLITE_FORWARD = """
CREATE TRIGGER IF NOT EXISTS portal_auditevent_no_update BEFORE UPDATE ON portal_auditevent
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


def forward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FORWARD)
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE_FORWARD)


def backward(apps, schema_editor):
    # On SQLite the UPDATE trigger belongs to 0002 and stays.
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(PG_BACKWARD)


class Migration(migrations.Migration):
    dependencies = [("portal", "0013_audit_actor_facility")]

    operations = [migrations.RunPython(forward, backward)]
