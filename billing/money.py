"""How money reads everywhere it is shown: the ISO currency code, a space, then the amount with
thousands separators and two decimals ("USD 1,234.50"). One format for the invoice page, its
PDF, the facility's billing page and the staff dashboard; the code rather than a symbol because
"$" is ambiguous across currencies and the PDF's fonts have no glyph for most symbols.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


def format_money(amount: Decimal | int, currency: str) -> str:
    """Decimal("1.0000"), "USD" -> "USD 1.00"; negative amounts as "-USD 1.00"."""
    value = Decimal(amount).quantize(CENT, ROUND_HALF_UP)
    sign = "-" if value < 0 else ""
    return f"{sign}{currency} {abs(value):,.2f}"


def format_price(amount: Decimal | int, currency: str) -> str:
    """A unit price: two decimals like any money, unless the price really has fractions of a
    cent (a per-image price of 0.0125), which are kept so that quantity times price still
    checks against the line's amount. Decimal("1.5000") -> "USD 1.50"."""
    value = Decimal(amount)
    if value == value.quantize(CENT):
        return format_money(value, currency)
    digits = -value.normalize().as_tuple().exponent  # type: ignore[operator]
    sign = "-" if value < 0 else ""
    return f"{sign}{currency} {abs(value):,.{digits}f}"
