"""Metering of delivered data, plans and invoices (built in the billing issue)."""
