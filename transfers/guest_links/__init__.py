"""Guest links: a share to a physician without an account, opened by its link and a one-time
code e-mailed to the address it was sent to."""
