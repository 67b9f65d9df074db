"""``public_reason``: one clean line that says why something failed, fit for a client and for a log line.

A failure that crossed processes carries Ray's task header ("ray::Deployment.method() (pid=12, ip=...)"),
terminal colour codes, a traceback, addresses, file paths and long ids; none of that may reach a client, and
none of it belongs in the one log line per failure (the traceback goes to the log at debug level).
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # colour and cursor codes (Ray colours its task headers)
_INTERNALS = re.compile(r"ray::\S+|\((?:pid|ip)=[^)]*\)|\b(?:pid|ip|actor_id|task_id|node_id)=\S+"
                        r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|(?:[A-Za-z]:)?(?:[/\\][\w.\-]+){2,}[/\\]?"
                        r"|\b[0-9a-f]{16,}\b")


def public_reason(e: BaseException, limit: int = 200, paths: bool = False) -> str:
    """``"Type: first line of the message"`` of an exception: a RayTaskError gives its cause, only the first
    line that says something is kept (no colour codes, no traceback), pids, addresses, paths and ids are cut.
    ``paths=True`` keeps them: a message about an admin's own input (the folder or URI it named), told back to
    that admin."""
    cause = getattr(e, "cause", None)  # RayTaskError wraps the exception the replica raised
    if isinstance(cause, BaseException):
        e = cause
    cut = (lambda line: line) if paths else (lambda line: _INTERNALS.sub("", line))
    lines = [re.sub(r"\s{2,}", " ", cut(line)).strip(" :,")
             for line in _ANSI.sub("", str(e)).strip().splitlines()]
    text = next((line for line in lines if line), "")
    if len(text) > limit:
        text = text[:limit].rstrip() + "..."
    name = type(e).__name__
    return f"{name}: {text}" if text else name
