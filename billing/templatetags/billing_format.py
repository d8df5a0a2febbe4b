"""Template filters for money, prices, quantities and data sizes: Decimal in, text out, never
through float. Money reads the same everywhere (see billing.money)."""

from __future__ import annotations

from decimal import Decimal

from django import template

from billing.documents import quantity_text
from billing.money import format_money, format_price
from billing.plans import gb

register = template.Library()


@register.filter
def money(value: Decimal | int | None, currency: str = "") -> str:
    """12345.6, "USD" -> "USD 12,345.60". Give the currency: the bare number ("12,345.60")
    is only for templates not yet updated."""
    if value is None:
        return ""
    if not currency:
        return f"{Decimal(value):,.2f}"
    return format_money(Decimal(value), currency)


@register.filter
def price(value: Decimal | int | None, currency: str) -> str:
    """A unit price: Decimal("1.0000"), "USD" -> "USD 1.00" (sub-cent prices keep their digits)."""
    if value is None:
        return ""
    return format_price(Decimal(value), currency)


@register.filter
def quantity(line: object) -> str:
    """An invoice line's quantity with its unit: "1 study", "2 studies", "3.5 GB"."""
    return quantity_text(getattr(line, "quantity"), str(getattr(line, "unit")))  # noqa: B009


@register.filter
def gigabytes(nbytes: int | None) -> str:
    """Bytes as GB (10⁹ bytes) with three decimals: 1234567890 -> "1.235"."""
    return f"{gb(int(nbytes or 0)):,.3f}"
