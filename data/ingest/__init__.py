"""Ingestion: corpus files -> documents -> ~100-word passages with KILT provenance."""
