"""Billing's Celery task: issue last month's invoices (beat, on the first days of each month).

The beat entry runs it on the 1st, 2nd and 3rd at 03:15: invoicing is idempotent, so the later
runs cost a few queries and catch a month whose first run was missed or killed, and a Celery
time zone that differs from the billing one cannot make it run before the month has ended
(`invoice_month` refuses a month still running).
"""

from __future__ import annotations

from celery import shared_task

from .invoicing import invoice_month, month_is_over, previous_month


@shared_task(soft_time_limit=1500, time_limit=1800)
def invoice_previous_month() -> dict[str, int | str]:
    period = previous_month()
    if not month_is_over(period):  # cannot happen with a sane clock; never invoice early
        return {"period": f"{period:%Y-%m}", "issued": 0}
    run = invoice_month(year=period.year, month=period.month)
    return {
        "period": f"{period:%Y-%m}",
        "issued": run.issued,
        "already": run.already,
        "empty": run.empty,
        "notified": run.notified,
    }
