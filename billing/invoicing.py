"""Monthly invoicing: one invoice per facility per month, issued once, never changed.

`invoice_month(year=..., month=...)` prices the month for every facility (`bills_for_month`,
a constant number of queries) and issues the invoices in batches. Each batch is one
transaction that inserts its invoices with INSERT ... ON CONFLICT DO NOTHING (Django's
`ignore_conflicts`), reads back the rows carrying its own `run_id`, and inserts their lines.
So:

- **Idempotent.** The unique (facility, period) constraint decides: a second run, or a rerun
  after a partial one, inserts nothing for a facility already invoiced.
- **Killed halfway.** A batch commits whole or not at all; the rerun issues what is missing.
  No invoice ever exists without its lines.
- **Two workers at once.** Both insert; on PostgreSQL the second waits on the first's
  uncommitted rows and then skips them; on SQLite writes are serialised by the database lock.
  Each worker adds lines only to the invoices its own `run_id` inserted.
- **A month with no usage.** A facility on pay as you go that received nothing gets no invoice
  (nothing is owed and an e-mail saying so is noise); a facility with a subscription gets its
  fee invoiced whether it used the allowance or not.
- **A month still running** is refused unless asked explicitly (`allow_open_month`), because
  deliveries after the invoice would never be billed.

Facility admins are e-mailed when their invoice is issued (`invoices_notify`): each invoice is
claimed for notification with a conditional UPDATE of `notified_at`, in the transaction that
queues the e-mails, so a rerun notifies only invoices not yet notified.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal

from django.db import transaction
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone

from portal.emails import email_queue
from portal.models import Facility, Membership, Role, User

from .conf import billing_tz
from .models import CreditNote, Invoice, InvoiceLine
from .money import format_money
from .plans import ZERO, Bill, BillingError, bills_for_month, money, next_month

log = logging.getLogger(__name__)

BATCH_SIZE = 200


@dataclass(frozen=True)
class InvoiceRun:
    period: date
    issued: int  # invoices this run inserted
    already: int  # facilities invoiced before this run (or by another worker meanwhile)
    empty: int  # facilities with nothing to invoice
    notified: int  # invoices whose admins this run e-mailed


def month_is_over(period: date) -> bool:
    """Whether the month starting on `period` has ended in the billing time zone."""
    end = datetime.combine(next_month(period), time.min, tzinfo=billing_tz())
    return timezone.now() >= end


def previous_month() -> date:
    """The first day of last month, in the billing time zone."""
    today = timezone.now().astimezone(billing_tz()).date()
    return (today.replace(day=1) - timedelta(days=1)).replace(day=1)


def invoice_month(
    *, year: int, month: int, allow_open_month: bool = False, batch_size: int = BATCH_SIZE
) -> InvoiceRun:
    """Issue the invoices of one month for every facility that owes something."""
    if not 1 <= month <= 12:
        raise BillingError(f"there is no month {month}")
    period = date(year, month, 1)
    if not allow_open_month and not month_is_over(period):
        raise BillingError(
            f"{period:%B %Y} has not ended yet in {billing_tz()}; deliveries after the "
            "invoice would never be billed"
        )
    done = set(
        Invoice.objects.filter(period=period).order_by().values_list("facility_id", flat=True)
    )
    bills = bills_for_month(period=period)
    due = [bill for fid, bill in sorted(bills.items()) if fid not in done and not bill.is_empty]
    empty = sum(1 for bill in bills.values() if bill.is_empty)
    names = {
        pk: (name, slug)
        for pk, name, slug in Facility.objects.values_list("pk", "name", "slug").order_by()
    }
    issued = 0
    for start in range(0, len(due), batch_size):
        issued += _issue_batch(due[start : start + batch_size], names=names)
    notified = invoices_notify(period=period)
    run = InvoiceRun(
        period=period,
        issued=issued,
        already=len(due) - issued + len(done),
        empty=empty,
        notified=notified,
    )
    log.info("invoiced %s: %s", f"{period:%Y-%m}", run)
    return run


def invoice_number(*, period: date, slug: str) -> str:
    """Readable and unique by construction: one invoice per facility and month."""
    return f"{period:%Y-%m}-{slug.upper()}"


def _issue_batch(bills: list[Bill], *, names: dict[int, tuple[str, str]]) -> int:
    if not bills:
        return 0
    run_id = uuid.uuid4()
    now = timezone.now()
    with transaction.atomic():
        _invoices_insert(bills, names=names, run_id=run_id, now=now, unique_suffix=False)
        # Slugs differing only in case ("abc", "ABC") make the same number: those invoices get
        # the facility's id as well, rather than being dropped as if already issued.
        period = bills[0].period
        issued = set(
            Invoice.objects.filter(
                period=period, facility_id__in=[b.facility_id for b in bills]
            ).values_list("facility_id", flat=True)
        )
        missing = [bill for bill in bills if bill.facility_id not in issued]
        if missing:
            _invoices_insert(missing, names=names, run_id=run_id, now=now, unique_suffix=True)
            if Invoice.objects.filter(
                period=period, facility_id__in=[b.facility_id for b in missing]
            ).count() != len(missing):
                raise BillingError("an invoice number collided twice; nothing of this batch kept")
        mine = dict(
            Invoice.objects.filter(run_id=run_id).values_list("facility_id", "pk").order_by()
        )
        by_facility = {bill.facility_id: bill for bill in bills}
        InvoiceLine.objects.bulk_create(
            InvoiceLine(
                invoice_id=invoice_id,
                position=position,
                kind=line.kind,
                description=line.description[:300],
                quantity=line.quantity,
                unit=line.unit,
                unit_price=line.unit_price,
                amount=line.amount,
                starts_on=line.starts_on,
                ends_on=line.ends_on,
            )
            for facility_id, invoice_id in mine.items()
            for position, line in enumerate(by_facility[facility_id].lines, start=1)
        )
    return len(mine)


def _invoices_insert(
    bills: list[Bill],
    *,
    names: dict[int, tuple[str, str]],
    run_id: uuid.UUID,
    now: datetime,
    unique_suffix: bool,
) -> None:
    """Insert the invoices; one already there (another worker's, or a number taken) is skipped."""
    Invoice.objects.bulk_create(
        [
            Invoice(
                number=invoice_number(period=bill.period, slug=names[bill.facility_id][1])
                + (f"-{bill.facility_id}" if unique_suffix else ""),
                facility_id=bill.facility_id,
                facility_name=names[bill.facility_id][0],
                period=bill.period,
                currency=bill.currency,
                total=bill.total,
                records=bill.usage.records,
                bytes=bill.usage.bytes,
                images=bill.usage.images,
                studies=bill.studies,
                courier_cost=bill.courier_cost,
                issued_at=now,
                run_id=run_id,
            )
            for bill in bills
        ],
        ignore_conflicts=True,
    )


def invoices_notify(*, period: date) -> int:
    """E-mail the admins of each facility whose invoice for `period` was not announced yet."""
    with transaction.atomic():
        pending = list(
            Invoice.objects.select_for_update(skip_locked=True)
            .filter(period=period, notified_at__isnull=True)
            .order_by("pk")
        )
        if not pending:
            return 0
        Invoice.objects.filter(pk__in=[i.pk for i in pending], notified_at__isnull=True).update(
            notified_at=timezone.now()
        )
        admins: dict[int, list[User]] = defaultdict(list)
        for membership in Membership.objects.filter(
            facility_id__in={i.facility_id for i in pending}, role=Role.ADMIN
        ).select_related("user", "facility"):
            if membership.user.is_active:
                admins[membership.facility_id].append(membership.user)
        slugs = dict(
            Facility.objects.filter(pk__in={i.facility_id for i in pending})
            .order_by()
            .values_list("pk", "slug")
        )
        for invoice in pending:
            link = reverse(
                "invoice_detail",
                kwargs={"slug": slugs[invoice.facility_id], "invoice_uuid": invoice.uuid},
            )
            for user in admins.get(invoice.facility_id, []):
                email_queue(
                    name="invoice_issued",
                    to=user.email,
                    context={"invoice": invoice, "link": link},
                )
    return len(pending)


# --- after issue ----------------------------------------------------------------------------------


def invoice_credited(invoice: Invoice) -> Decimal:
    total = invoice.credit_notes.aggregate(s=Sum("amount"))["s"]
    return total if total is not None else ZERO


def invoice_mark_paid(*, invoice: Invoice, at: datetime | None = None) -> bool:
    """Record payment: the one change an issued invoice admits. False if already paid."""
    return bool(
        Invoice.objects.filter(pk=invoice.pk, paid_at__isnull=True).update(
            paid_at=at or timezone.now()
        )
    )


def credit_note_issue(
    *, invoice: Invoice, amount: Decimal, reason: str, by: User | None
) -> CreditNote:
    """Correct an issued invoice by crediting part or all of it; the invoice stays as it was."""
    amount = money(Decimal(amount))
    if amount <= 0:
        raise BillingError("A credit note is for a positive amount.")
    if not reason.strip():
        raise BillingError("Say why the invoice is credited.")
    with transaction.atomic():
        # Serialise credit notes of one invoice so that two cannot together exceed its total.
        locked = Invoice.objects.select_for_update().get(pk=invoice.pk)
        credited = invoice_credited(locked)
        if credited + amount > locked.total:
            raise BillingError(
                f"At most {format_money(locked.total - credited, locked.currency)} can still be"
                " credited."
            )
        count = locked.credit_notes.count()
        return CreditNote.objects.create(
            number=f"CN-{locked.number}-{count + 1}",
            invoice=locked,
            amount=amount,
            currency=locked.currency,
            reason=reason.strip()[:300],
            issued_by=by,
        )
