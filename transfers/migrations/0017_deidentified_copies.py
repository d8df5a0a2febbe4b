# De-identified copies and their mapping (transfers.models.deidentify).

import django.db.models.deletion
import django.utils.timezone
import uuid
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('portal', '0017_facility_billing_address'),
        ('transfers', '0016_share_forwarded_from'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='DeidentifiedCopy',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('uuid', models.UUIDField(default=uuid.uuid4, editable=False, unique=True)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('finished_at', models.DateTimeField(blank=True, null=True)),
                ('status', models.CharField(choices=[('making', 'Being made'), ('done', 'Made'), ('failed', 'Failed')], default='making', max_length=8)),
                ('error', models.CharField(blank=True, max_length=300)),
                ('retain_dates', models.BooleanField(default=False)),
                ('clean_descriptors', models.BooleanField(default=False)),
                ('retain_device', models.BooleanField(default=False)),
                ('date_offset_days', models.IntegerField(default=0)),
                ('uid_key', models.CharField(max_length=64)),
                ('patient_name', models.CharField(max_length=64)),
                ('patient_id', models.CharField(max_length=64)),
                ('uid_map', models.JSONField(blank=True, default=dict)),
                ('burned_in_series', models.JSONField(blank=True, default=list)),
                ('withheld', models.PositiveIntegerField(default=0)),
                ('created_by', models.ForeignKey(null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
                ('facility', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='+', to='portal.facility')),
                ('original', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='deidentified_copies', to='transfers.study')),
                ('share', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='deidentified_copies', to='transfers.share')),
                ('study', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, related_name='deidentified_copy', to='transfers.study')),
            ],
            options={
                'ordering': ('created_at', 'id'),
            },
        ),
    ]
