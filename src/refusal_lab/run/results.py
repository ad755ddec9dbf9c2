"""Placeholder until the typed schema lands (issue 11)."""

SCHEMA_VERSION = 1
