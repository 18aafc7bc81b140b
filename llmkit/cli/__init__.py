"""The `llmkit` command line (Typer)."""
