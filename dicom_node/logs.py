"""Logging set-up: human-readable lines by default, JSON lines by ``logging.format: json``.

What is logged is the callers' business: UIDs, AE titles and job ids, never patient
names, IDs or birth dates.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

__all__ = ["setup_logging"]

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _not_our_own_association(record: logging.LogRecord) -> bool:
    """Drop what pynetdicom logs in an association the node requested (a send, an echo):
    its two or three ERROR lines for a refused connection or a rejection say again what the
    node's own line says, with the destination's name and what happens next."""
    if not record.name.startswith("pynetdicom"):
        return True
    thread = threading.current_thread()  # the association's thread, or its DUL's (which knows the association)
    association = getattr(thread, "_assoc", thread)
    return not getattr(association, "is_requestor", False)


def setup_logging(level: str = "INFO", format: str = "text") -> None:
    """Log lines to stderr at ``level``. pynetdicom's own logger stays at WARNING, and its
    lines about the node's outgoing associations are left out, unless ``level`` is DEBUG
    (then all of pynetdicom's lines are kept, for a peer's conversation in full)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if format == "json" else logging.Formatter(_TEXT))
    debug = logging.getLevelName(str(level).upper()) == logging.DEBUG
    if not debug:
        handler.addFilter(_not_our_own_association)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
