"""What the server's logs may hold.

Never request bodies, image bytes, file names, DICOM values or secrets: the app logs counts,
sizes and ids, libraries that could echo file content are kept quiet, and a filter on every
handler (uvicorn's access log included) turns bytes into their length and replaces the values
of every query string and the secret part of anything shaped like an API key with ``[redacted]``.
"""

from __future__ import annotations

import logging
import re
import sys
from copy import deepcopy


# Anything shaped like an API key (the secret part may be cut or mangled), and a query string.
_KEY_LIKE = re.compile(r"(dsk_[0-9A-Za-z]{0,32}_)[A-Za-z0-9_\-]+")
_QUERY = re.compile(r"\?([^\s\"'#]+)")


def redact_secrets(text: str) -> str:
    """`text` with the secret part of key-shaped strings and every query-string value
    replaced by ``[redacted]`` (parameter names stay: ``?order=[redacted]``)."""
    def query(match: re.Match) -> str:
        parts = (p.split("=", 1)[0] + "=[redacted]" if "=" in p else "[redacted]" for p in match.group(1).split("&"))
        return "?" + "&".join(parts)

    return _QUERY.sub(query, _KEY_LIKE.sub(r"\1[redacted]", text))


class RedactFilter(logging.Filter):
    """Never let bytes (image or DICOM content), very long values or secrets (API keys,
    query strings: see `redact_secrets`) reach a log line."""

    MAX_ARGUMENT = 300
    MAX_MESSAGE = 2000

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, (bytes, bytearray, memoryview)):
            record.msg, record.args = f"<{len(record.msg)} bytes>", None
        if isinstance(record.msg, str) and not record.args:  # a format string is left alone ("?%s")
            record.msg = redact_secrets(record.msg)
        if isinstance(record.args, dict):
            record.args = {k: self._safe(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(self._safe(a) for a in record.args)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is no reason to lose the line
            return True
        if len(message) > self.MAX_MESSAGE:
            record.msg, record.args = message[: self.MAX_MESSAGE] + " [truncated]", None
        return True

    def _safe(self, value: object) -> object:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"<{len(value)} bytes>"
        if isinstance(value, str):
            value = redact_secrets(value)
            return value[: self.MAX_ARGUMENT] + "..." if len(value) > self.MAX_ARGUMENT else value
        return value


# Libraries that could put file content or header values into a log line.
QUIET_LOGGERS = {"python_multipart": logging.WARNING, "multipart": logging.WARNING, "pydicom": logging.CRITICAL,
                 "PIL": logging.WARNING}


def quiet_libraries() -> None:
    """Raise the log level of the libraries in QUIET_LOGGERS."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


class StderrHandler(logging.StreamHandler):
    """A stream handler on whatever sys.stderr is when a record comes (not when the
    handler was made: a replaced or closed stream never breaks logging)."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr


class StdoutHandler(StderrHandler):
    @property
    def stream(self):
        return sys.stdout


def log_config(level: str = "info") -> dict:
    """uvicorn's logging configuration plus DermSight's loggers, every handler filtered."""
    from uvicorn.config import LOGGING_CONFIG

    config = deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": RedactFilter}}
    for handler in config["handlers"].values():
        stream = handler.pop("stream", "ext://sys.stderr")
        handler["class"] = f"{__name__}.{'StdoutHandler' if stream.endswith('stdout') else 'StderrHandler'}"
        handler["filters"] = ["redact"]
    config["formatters"]["dermsight"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["dermsight"] = {"class": f"{__name__}.StderrHandler", "formatter": "dermsight",
                                      "filters": ["redact"]}
    config["loggers"]["dermsight"] = {"handlers": ["dermsight"], "level": level.upper(), "propagate": False}
    for name, value in QUIET_LOGGERS.items():
        config["loggers"][name] = {"level": logging.getLevelName(value)}
    return config


def configure_logging(level: str = "info") -> None:
    """Apply `log_config(level)` to this process."""
    import logging.config

    logging.config.dictConfig(log_config(level))

