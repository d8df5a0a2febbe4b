# The acting person's facility on each audit event.

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('portal', '0012_audit_siem_cursor'),
    ]

    operations = [
        migrations.AddField(
            model_name='auditevent',
            name='actor_facility',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='portal.facility'),
        ),
        migrations.AddIndex(
            model_name='auditevent',
            index=models.Index(fields=['actor_facility', '-at'], name='audit_actor_facility_at'),
        ),
    ]
