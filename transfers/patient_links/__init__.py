"""Patient links: the sender's handout, the patient's second factor, and the patient's pages
(no sign-in)."""
