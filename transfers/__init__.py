"""Studies and everything that moves them: ingest, worklist, sharing, viewing, export."""
