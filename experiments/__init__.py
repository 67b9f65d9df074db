"""Experiments built on the project (not part of the installed wheel); run them from the repository root."""
