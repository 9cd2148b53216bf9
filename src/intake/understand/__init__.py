"""Bytes to meaning: parsing, sender authentication, quality scoring, reply tokens and routing."""
