# Placeholder in the chain; its owner writes the operations.
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("portal", "0011_facility_directory")]

    operations: list = []
