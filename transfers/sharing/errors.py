"""The refusal of sharing's services, in a module of its own so that the checks they call
(`message.py`) can raise it without importing the services back."""

from __future__ import annotations


class ShareError(Exception):
    """A refusal shown to the person who asked."""
