"""Experiments that use calm-ray like a user would; not part of the installed packages."""
