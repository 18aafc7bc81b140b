"""Fuzz harness (atheris): GGUF headers, images, documents and `check --batch` lines."""
