"""Patient reconciliation: a disc from elsewhere takes the local patient identity."""
