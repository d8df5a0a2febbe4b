"""What an invoice says besides its lines, shared by its HTML page and its PDF: who issues it
(seller name, address and tax id from settings), who pays it (the facility's billing address),
the issue and due dates and the payment terms, and quantities with correct plurals.

The seller and the terms are read when the invoice is shown, not copied onto it: they are the
operator's own details, which change rarely and apply to every invoice alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from django.template.defaultfilters import pluralize

from .conf import billing_tz, payment_terms_days, seller_address_lines, seller_name, seller_tax_id

if TYPE_CHECKING:
    from .models import Invoice

# A line's unit as stored (plural) -> its singular, for "1 study" rather than "1 studies".
SINGULAR = {"studies": "study", "images": "image", "months": "month", "transfers": "transfer"}


@dataclass(frozen=True)
class InvoiceParties:
    seller_name: str
    seller_address: list[str]
    seller_tax_id: str
    bill_to_name: str
    bill_to_address: list[str]
    issued_on: date
    due_on: date
    terms_days: int

    @property
    def terms(self) -> str:
        days = self.terms_days
        if days <= 0:
            return "Due on receipt."
        return (
            f"Net {days}: payment due within {days} day{pluralize(days)} of the invoice date, "
            f"by {self.due_on:%B} {self.due_on.day}, {self.due_on.year}."
        )


def invoice_parties(*, invoice: Invoice) -> InvoiceParties:
    issued_on = invoice.issued_at.astimezone(billing_tz()).date()
    days = payment_terms_days()
    address = invoice.facility.billing_address
    return InvoiceParties(
        seller_name=seller_name(),
        seller_address=seller_address_lines(),
        seller_tax_id=seller_tax_id(),
        bill_to_name=invoice.facility_name,
        bill_to_address=[line.strip() for line in address.splitlines() if line.strip()],
        issued_on=issued_on,
        due_on=issued_on + timedelta(days=max(days, 0)),
        terms_days=days,
    )


def quantity_text(quantity: Decimal, unit: str) -> str:
    """Decimal("1.000000"), "studies" -> "1 study"; Decimal("2"), "studies" -> "2 studies"."""
    number = quantity.normalize()
    if number == number.to_integral_value():
        number = number.quantize(Decimal(1))
    if number == 1 and unit in SINGULAR:
        unit = SINGULAR[unit]
    return f"{number:,f} {unit}"
