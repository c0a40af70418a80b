"""KILT: the record format (reading, validation, answers) and the official metrics."""
