"""De-identified sharing: a copy of a study without the patient's identity, for one share."""
