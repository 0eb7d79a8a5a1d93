"""Shared pytest configuration: pytest-twisted drives the default reactor."""
