"""`manage.py invoice_month YYYY-MM [--allow-open-month]`: issue one month's invoices by hand.

Safe to run again, or next to the beat task: facilities already invoiced are skipped.
"""

from __future__ import annotations

import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.invoicing import invoice_month
from billing.plans import BillingError


class Command(BaseCommand):
    help = "Issue the invoices of one month (billing time zone) for every facility that owes."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("month", help="the month to invoice, as YYYY-MM")
        parser.add_argument(
            "--allow-open-month",
            action="store_true",
            help="invoice a month that has not ended yet (later deliveries of it are not billed)",
        )

    def handle(
        self, *args: Any, month: str, allow_open_month: bool = False, **options: Any
    ) -> None:
        match = re.fullmatch(r"(\d{4})-(\d{2})", month.strip())
        if match is None:
            raise CommandError(f"give the month as YYYY-MM, not {month!r}")
        try:
            run = invoice_month(
                year=int(match[1]), month=int(match[2]), allow_open_month=allow_open_month
            )
        except BillingError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"{run.period:%Y-%m}: {run.issued} invoice(s) issued, {run.already} already issued,"
            f" {run.empty} facilit{'y' if run.empty == 1 else 'ies'} with nothing to invoice,"
            f" {run.notified} notified"
        )
