"""Share.notified_instances: the images its recipients were told of, so that images arriving
after the first notice are told as "N new images added". Shares already notified start at
their studies' current count, so nobody is told of images they already had."""

from __future__ import annotations

from typing import Any

from django.db import migrations, models
from django.db.models import Sum


def _count_notified(apps: Any, schema_editor: Any) -> None:
    Share = apps.get_model("transfers", "Share")
    for share in Share.objects.filter(notify_status="sent").only("pk").iterator():
        total = share.studies.aggregate(n=Sum("num_instances"))["n"] or 0
        Share.objects.filter(pk=share.pk).update(notified_instances=total)


class Migration(migrations.Migration):
    dependencies = [("transfers", "0012_destination_tls")]

    operations = [
        migrations.AddField(
            model_name="share",
            name="notified_instances",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AlterField(
            model_name="shareevent",
            name="kind",
            field=models.CharField(
                choices=[
                    ("created", "Created"),
                    ("notified", "Recipient notified"),
                    ("updated", "Images added"),
                    ("notify_failed", "Notification failed"),
                    ("opened", "Opened"),
                    ("downloaded", "Downloaded"),
                    ("imported", "Imported"),
                    ("expired", "Expired"),
                    ("revoked", "Revoked"),
                    ("extended", "Expiry extended"),
                    ("purged", "Images purged"),
                    ("locked", "Patient link locked"),
                    ("unlocked", "Patient link unlocked"),
                    ("reissued", "Patient link re-issued"),
                ],
                max_length=16,
            ),
        ),
        migrations.RunPython(_count_notified, migrations.RunPython.noop),
    ]
