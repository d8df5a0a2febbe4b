"""Studies and everything that moves them.

The study core sits at the root: the models (one module per feature under `models/`), ingest of
every file that arrives (`ingest`), the upload API (`api`), completion (`completion`), who may
open a study (`access`), reports, the worklist and study pages (`views`), the purge, and the one
seam through which deliveries are announced (`deliveries`). Each feature is a package of its own
with its services, tasks, views and URLs: `sharing`, `patient_links`, `viewer`, `dicom`, `media`,
`reconcile`. Features import the core, never the other way (tests/test_architecture.py).
"""
