"""Sharing studies with a facility, a physician or a patient: the share, its e-mail, its
timeline of receipts, expiry, Inbox and Sent."""
