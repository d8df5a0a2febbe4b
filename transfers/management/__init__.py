"""Management commands of transfers."""
