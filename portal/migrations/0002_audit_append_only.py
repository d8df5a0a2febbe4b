"""The audit trail is append-only in the database too, not only in the application.

UPDATE is refused on every database; DELETE is refused on PostgreSQL (on SQLite the test
runner empties tables with DELETE, and SQLite is the single-machine embedded default).
"""

from django.db import migrations

PG_FORWARD = """
CREATE OR REPLACE FUNCTION portal_auditevent_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER portal_auditevent_no_update BEFORE UPDATE ON portal_auditevent
    FOR EACH ROW EXECUTE FUNCTION portal_auditevent_append_only();
CREATE TRIGGER portal_auditevent_no_delete BEFORE DELETE ON portal_auditevent
    FOR EACH ROW EXECUTE FUNCTION portal_auditevent_append_only();
"""
PG_BACKWARD = """
DROP TRIGGER IF EXISTS portal_auditevent_no_update ON portal_auditevent;
DROP TRIGGER IF EXISTS portal_auditevent_no_delete ON portal_auditevent;
DROP FUNCTION IF EXISTS portal_auditevent_append_only();
"""
SQLITE_FORWARD = """
CREATE TRIGGER portal_auditevent_no_update BEFORE UPDATE ON portal_auditevent
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""
SQLITE_BACKWARD = "DROP TRIGGER IF EXISTS portal_auditevent_no_update;"


def forward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FORWARD)
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE_FORWARD)


def backward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_BACKWARD)
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE_BACKWARD)


class Migration(migrations.Migration):
    dependencies = [("portal", "0001_initial")]
    operations = [migrations.RunPython(forward, backward)]
