"""The audit trail cannot be changed, deleted or emptied in the database, by the application's
own database role; and the role the README documents is enough to run the application.

PostgreSQL tests run as a role made for the test inside the test's transaction (CREATE ROLE,
GRANT and SET LOCAL ROLE are all rolled back with it), never as the superuser the test runner
connects as: a superuser may do anything, including dropping the triggers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from django.db import DatabaseError, connection, transaction

from portal.audit import audit_record
from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, require_postgresql

pytestmark = pytest.mark.django_db

# The statements the README ("Database roles") gives the owner to run after each migrate, with
# the role names as placeholders.
README_GRANTS = """
GRANT USAGE ON SCHEMA public TO {app};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app};
REVOKE UPDATE, DELETE, TRUNCATE ON portal_auditevent FROM {app};
"""

UPDATE = "UPDATE portal_auditevent SET outcome = 'failure' WHERE id = %s"


def _needs_postgresql() -> None:
    require_postgresql("PostgreSQL only (CI runs it with DATABASE_URL); SQLite has no roles")


def _refused(sql: str, *params: int | str) -> bool:
    """Whether the database refuses `sql` (in a savepoint, so the test goes on)."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, params)
    except DatabaseError:
        return True
    return False


@pytest.fixture
def event(krmc: Facility) -> AuditEvent:
    return audit_record(action=AuditAction.PURGE, facility=krmc, detail={"why": "test"})


@pytest.fixture
def app_role() -> Iterator[str]:
    """A role with every privilege on the tables but owning none: what a careless setup gives
    the application. The test's transaction rolls the role back."""
    _needs_postgresql()
    role = f"relay_test_{uuid.uuid4().hex[:12]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role} NOLOGIN")
        cursor.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        cursor.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        cursor.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
    yield role


def test_it_keeps_its_update_trigger_after_every_migration() -> None:
    # A migration that rebuilds the table on SQLite drops its triggers; 0014 makes it again.
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger'"
                " AND tbl_name = 'portal_auditevent'"
            )
            assert {row[0] for row in cursor.fetchall()} == {"portal_auditevent_no_update"}
        else:
            cursor.execute(
                "SELECT tgname FROM pg_trigger"
                " WHERE tgrelid = 'portal_auditevent'::regclass AND NOT tgisinternal"
            )
            assert {row[0] for row in cursor.fetchall()} == {
                "portal_auditevent_no_update",
                "portal_auditevent_no_delete",
                "portal_auditevent_no_truncate",
            }


def test_an_update_is_refused(event: AuditEvent) -> None:
    assert _refused(UPDATE, event.pk)
    event.refresh_from_db()
    assert event.outcome == "success"


def test_even_a_role_granted_everything_cannot_truncate_update_or_delete(
    app_role: str, event: AuditEvent
) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL ROLE {app_role}")
    assert _refused("TRUNCATE portal_auditevent")
    assert _refused("TRUNCATE portal_facility, portal_user CASCADE")
    assert _refused(UPDATE, event.pk)
    assert _refused("DELETE FROM portal_auditevent WHERE id = %s", event.pk)
    # It owns no table, so it cannot switch the triggers off either.
    assert _refused("ALTER TABLE portal_auditevent DISABLE TRIGGER ALL")
    assert _refused("DROP TRIGGER portal_auditevent_no_truncate ON portal_auditevent")
    # Still there, unchanged.
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), min(outcome) FROM portal_auditevent")
        assert cursor.fetchone() == (1, "success")


def test_the_readmes_grants_run_the_app_and_keep_the_trail_append_only(
    alice: User, krmc: Facility, event: AuditEvent
) -> None:
    _needs_postgresql()
    role = f"relay_app_{uuid.uuid4().hex[:12]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role} NOLOGIN")
        for statement in README_GRANTS.format(app=role).strip().split(";"):
            if statement.strip():
                cursor.execute(statement)
        cursor.execute(f"SET LOCAL ROLE {role}")
        cursor.execute("SELECT current_user")
        assert cursor.fetchone() == (role,)

    # The application works: a signed-in admin reads the log (sessions, audit events written).
    admin = client_for(alice)
    assert admin.get("/facilities/krmc/audit/").status_code == 200
    assert admin.get("/facilities/krmc/audit/export/").status_code == 200
    assert AuditEvent.objects.filter(action="audit_export", actor=alice).exists()
    Facility.objects.filter(pk=krmc.pk).update(city="Kalispell, MT")

    # The trail does not move.
    assert _refused("TRUNCATE portal_auditevent")
    assert _refused(UPDATE, event.pk)
    assert _refused("DELETE FROM portal_auditevent WHERE id = %s", event.pk)
    assert _refused("ALTER TABLE portal_auditevent DISABLE TRIGGER ALL")
    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).delete()
