"""DICOM networking: the gateway PACS send to, pushes into a PACS, routing rules, and the
facility admin's DICOM configuration."""
