"""Expiry and purge (filled in by the purge work)."""

from __future__ import annotations
