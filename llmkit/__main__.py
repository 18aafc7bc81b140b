"""`python -m llmkit` runs the CLI."""

from llmkit.cli.app import main

main()
