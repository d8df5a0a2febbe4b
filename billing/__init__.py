"""Billing: metering of delivered image data, plans, monthly invoices and the operator's
dashboard."""
