"""Media: the study as an IHE PDI ZIP or a CD/DVD image, with its DICOMDIR."""
