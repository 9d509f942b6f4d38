"""Placeholder package: filled by its paper's issue (see ../shared/PAPERS.md)."""
