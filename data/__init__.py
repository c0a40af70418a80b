"""Data in and out: corpus ingestion (readers, chunking), KILT records and metrics, QA task reading."""
