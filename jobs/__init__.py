"""Thin entry points: `ray job submit` targets and command-line tools."""
