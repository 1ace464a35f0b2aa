"""Parsing uploads: PDF (in sandbox processes), text and Markdown into pages with character
offsets, and token-aware chunks that keep those offsets."""
