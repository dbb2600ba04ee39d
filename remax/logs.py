"""The ``remax`` logger: every message of the trainer and the command line, from rank 0 only.

``setup_logging`` gives the ``remax`` logger one handler writing plain lines to the current ``sys.stdout`` (warnings
and errors prefixed with their level) and sets its level; other ranks show errors only. To send the messages
elsewhere, replace the handlers of ``logging.getLogger("remax")``.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "remax"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest and notebooks replace it after import)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(_Format())

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass  # set by StreamHandler.__init__; the stream is always the current sys.stdout


def get_logger(name: str | None = None) -> logging.Logger:
    """``remax`` or its child ``remax.<name>``."""
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def setup_logging(level: str = "info", *, is_main: bool = True) -> logging.Logger:
    """Install the stdout handler on the ``remax`` logger (once) and set its level: ``level`` ("debug", "info",
    "warning", "error") on rank 0, "error" on the other ranks."""
    logger = get_logger()
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
        logger.propagate = False  # one copy of each line, also when the application configures the root logger
    logger.setLevel(getattr(logging, level.upper()) if is_main else logging.ERROR)
    return logger
