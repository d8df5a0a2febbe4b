"""Accounts, facilities and the audit trail."""
