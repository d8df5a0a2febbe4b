"""Issued invoices, their lines and credit notes cannot be changed, in the database too.

UPDATE of an invoice is refused unless it only sets `paid_at` or `notified_at`; UPDATE of a
line or a credit note is always refused. DELETE is refused on PostgreSQL only (on SQLite the
test runner empties tables with DELETE), as for the audit trail.
"""

from django.db import migrations

# Every column of billing_invoice except paid_at and notified_at.
FROZEN = (
    "id", "uuid", "number", "facility_id", "facility_name", "period", "currency", "total",
    "records", "bytes", "images", "studies", "courier_cost", "issued_at", "run_id",
)
PG_CHANGED = " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in FROZEN)
SQLITE_CHANGED = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in FROZEN)

PG_FORWARD = f"""
CREATE OR REPLACE FUNCTION billing_frozen() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'issued invoices and credit notes cannot be changed';
END;
$$ LANGUAGE plpgsql;
CREATE OR REPLACE FUNCTION billing_invoice_frozen() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'issued invoices cannot be deleted';
    END IF;
    IF {PG_CHANGED} THEN
        RAISE EXCEPTION 'issued invoices cannot be changed (only paid_at and notified_at)';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER billing_invoice_frozen BEFORE UPDATE OR DELETE ON billing_invoice
    FOR EACH ROW EXECUTE FUNCTION billing_invoice_frozen();
CREATE TRIGGER billing_invoiceline_frozen BEFORE UPDATE OR DELETE ON billing_invoiceline
    FOR EACH ROW EXECUTE FUNCTION billing_frozen();
CREATE TRIGGER billing_creditnote_frozen BEFORE UPDATE OR DELETE ON billing_creditnote
    FOR EACH ROW EXECUTE FUNCTION billing_frozen();
"""
PG_BACKWARD = """
DROP TRIGGER IF EXISTS billing_invoice_frozen ON billing_invoice;
DROP TRIGGER IF EXISTS billing_invoiceline_frozen ON billing_invoiceline;
DROP TRIGGER IF EXISTS billing_creditnote_frozen ON billing_creditnote;
DROP FUNCTION IF EXISTS billing_invoice_frozen();
DROP FUNCTION IF EXISTS billing_frozen();
"""
SQLITE_FORWARD = [
    f"""CREATE TRIGGER billing_invoice_frozen BEFORE UPDATE ON billing_invoice
    WHEN {SQLITE_CHANGED}
    BEGIN SELECT RAISE(ABORT, 'issued invoices and credit notes cannot be changed'); END;""",
    """CREATE TRIGGER billing_invoiceline_frozen BEFORE UPDATE ON billing_invoiceline
    BEGIN SELECT RAISE(ABORT, 'issued invoices and credit notes cannot be changed'); END;""",
    """CREATE TRIGGER billing_creditnote_frozen BEFORE UPDATE ON billing_creditnote
    BEGIN SELECT RAISE(ABORT, 'issued invoices and credit notes cannot be changed'); END;""",
]
SQLITE_BACKWARD = [
    "DROP TRIGGER IF EXISTS billing_invoice_frozen;",
    "DROP TRIGGER IF EXISTS billing_invoiceline_frozen;",
    "DROP TRIGGER IF EXISTS billing_creditnote_frozen;",
]


def forward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FORWARD)
    elif vendor == "sqlite":
        for statement in SQLITE_FORWARD:
            schema_editor.execute(statement)


def backward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_BACKWARD)
    elif vendor == "sqlite":
        for statement in SQLITE_BACKWARD:
            schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(forward, backward)]
