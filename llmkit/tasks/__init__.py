"""Tasks: plain functions that take an engine and return dataclasses."""
