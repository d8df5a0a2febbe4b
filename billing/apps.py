"""App config for billing."""

from __future__ import annotations

from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"

    def ready(self) -> None:
        # The one seam with transfers: every delivery it announces is metered here, in the
        # deliverer's transaction. Transfers knows nothing of billing.
        from transfers.deliveries import delivery_made

        from .metering import delivery_meter

        delivery_made.connect(delivery_meter, dispatch_uid="billing.metering.delivery_meter")
