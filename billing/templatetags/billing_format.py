"""Template filters for money and data sizes: Decimal in, text out, never through float."""

from __future__ import annotations

from decimal import Decimal

from django import template

from billing.plans import gb

register = template.Library()


@register.filter
def money(value: Decimal | int | None) -> str:
    """12345.6 -> "12,345.60"."""
    if value is None:
        return ""
    return f"{Decimal(value):,.2f}"


@register.filter
def gigabytes(nbytes: int | None) -> str:
    """Bytes as GB (10⁹ bytes) with three decimals: 1234567890 -> "1.235"."""
    return f"{gb(int(nbytes or 0)):,.3f}"
