"""DICOMweb (PS3.18) under /dicom-web/: QIDO-RS search and WADO-RS retrieve.

- `scope`: which studies a request may see (the portal's access rules, plus an API token's
  facility), for searches as one queryset and for retrievals through `transfers.access`;
- `search`: QIDO-RS matching and the DICOM JSON answers, straight from Relay's index;
- `accept`: the Accept header's media ranges (type, transfer-syntax, q);
- `retrieve`: WADO-RS instances, metadata, bulk data and frames, streamed as multipart/related;
- `views` and `urls`: the resources. STOW-RS, rendered and thumbnail resources are added
  beside these (their URLs in `urls`, their code in modules of their own).
"""
