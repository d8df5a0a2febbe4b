# Placeholder in the chain; its owner writes the operations.
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("portal", "0012_audit_siem_cursor")]

    operations: list = []
