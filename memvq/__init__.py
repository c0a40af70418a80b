"""memvq: see the README."""
