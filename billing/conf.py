"""Billing settings, read in one place with their defaults.

The variables are set in relay/settings.py from the environment (see the README, Billing); the
defaults here keep billing working on a checkout whose settings do not name them yet.
"""

from __future__ import annotations

from decimal import Decimal
from zoneinfo import ZoneInfo

from django.conf import settings

PATIENT_LINKS_TO_SENDER = "sender"
PATIENT_LINKS_FREE = "none"


def billing_tz() -> ZoneInfo:
    """The time zone whose calendar decides which month a delivery belongs to."""
    return ZoneInfo(getattr(settings, "RELAY_BILLING_TIME_ZONE", "America/Denver"))


def patient_links_billed_to() -> str:
    """ "sender": a patient link's deliveries are charged to the sending facility; "none": they
    are not metered at all."""
    value = getattr(settings, "RELAY_BILL_PATIENT_LINKS_TO", PATIENT_LINKS_TO_SENDER)
    if value not in (PATIENT_LINKS_TO_SENDER, PATIENT_LINKS_FREE):
        raise ValueError(f"RELAY_BILL_PATIENT_LINKS_TO must be 'sender' or 'none', not {value!r}")
    return str(value)


def billing_currency() -> str:
    """The currency of the default plan and of the courier price."""
    return str(getattr(settings, "RELAY_BILLING_CURRENCY", "USD"))


def courier_cd_price() -> Decimal:
    """What a courier charges for one CD, in the billing currency (one disc per study)."""
    return Decimal(str(getattr(settings, "RELAY_COURIER_CD_PRICE", "11.00")))


def default_price_per_gb() -> Decimal:
    """The per-GB price of the default plan when billing creates it (staff change it later)."""
    return Decimal(str(getattr(settings, "RELAY_DEFAULT_PRICE_PER_GB", "1.00")))


def seller_name() -> str:
    """Who issues the invoices."""
    return str(getattr(settings, "RELAY_SELLER_NAME", "Relay"))


def seller_address_lines() -> list[str]:
    """The seller's postal address, one string per line. A literal backslash-n counts as a line
    break too, because a .env file cannot easily hold a real one."""
    value = str(getattr(settings, "RELAY_SELLER_ADDRESS", "")).replace("\\n", "\n")
    return [line.strip() for line in value.splitlines() if line.strip()]


def seller_tax_id() -> str:
    return str(getattr(settings, "RELAY_SELLER_TAX_ID", ""))


def payment_terms_days() -> int:
    """Days from an invoice's issue date to its due date."""
    return int(getattr(settings, "RELAY_PAYMENT_TERMS_DAYS", 30))
