"""Our loggers' lines in Ray worker processes, marked so a quiet driver can keep them and drop the rest.

A quiet CLI (no ``-v``) starts Ray with ``MMR_MARK_WORKER_LOGS=1`` in the workers' environment. Importing
``operators`` in a worker then gives the ``operators`` and ``pipelines`` loggers a stderr handler whose lines
start with :data:`MARK`; :mod:`pipelines.ray_env` forwards only those lines to the driver's logging (its
redaction included) and drops library chatter (Ray Train bookkeeping, loaders, progress bars).
"""

from __future__ import annotations

import logging
import os
import sys

MARK = "\x1fmmr "  # a unit separator: never in a library's log line
MARK_ENV = "MMR_MARK_WORKER_LOGS"
OUR_LOGGERS = ("operators", "pipelines")
_PLAIN = "%(levelname)s %(name)s: %(message)s"
_OURS = "_mmr_worker_handler"


class _Marked(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # One marked line per record line: a multi-line message or traceback stays whole on the driver.
        text = super().format(record)
        head = f"{MARK}{record.levelname} {record.name}: "
        return "\n".join(head + line for line in text.splitlines() or [""])


def mark_worker_logs() -> None:
    """Install our loggers' stderr handler once, in a worker process whose environment asks for it: ``1``
    (a quiet CLI) marks the lines, ``info`` (a ``-v`` CLI) writes them plain. A Ray worker's root logger has
    no handler, so without one our INFO lines would be lost either way."""
    mode = os.environ.get(MARK_ENV)
    if mode not in ("1", "info"):
        return
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if any(getattr(h, _OURS, False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Marked("%(message)s") if mode == "1" else logging.Formatter(_PLAIN))
        setattr(handler, _OURS, True)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # else a root handler someone installed prints it a second time


def parse_marked(line: str) -> tuple[int, str, str] | None:
    """``(level, logger name, message)`` of a marked line, None for any other line."""
    i = line.find(MARK)
    if i < 0:
        return None
    level, _, rest = line[i + len(MARK):].partition(" ")
    name, _, msg = rest.partition(": ")
    num = logging.getLevelName(level)
    return (num if isinstance(num, int) else logging.INFO), name, msg
